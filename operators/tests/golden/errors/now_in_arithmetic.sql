CREATE SEGMENT recent AS
    max(timestamp) > now() - 3600;
