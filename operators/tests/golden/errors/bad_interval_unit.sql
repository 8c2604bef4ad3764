CREATE SEGMENT lapsed AS
    max(timestamp) < now() - INTERVAL '2 months';
