CREATE SEGMENT buyers AS
    count(*) FILTER (WHERE properties.quantity + 1) > 0;
