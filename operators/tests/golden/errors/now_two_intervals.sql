CREATE SEGMENT recent AS
    max(timestamp) > now() - INTERVAL '1 day' - INTERVAL '1 hour';
