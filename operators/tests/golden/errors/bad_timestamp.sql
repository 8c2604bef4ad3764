CREATE SEGMENT early_adopters AS
    min(timestamp) < TIMESTAMP '2026-13-01T00:00:00Z';
