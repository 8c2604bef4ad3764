CREATE SEGMENT weird AS
    count(*) > now();
