CREATE SEGMENT odd AS
    plan = 'pro' OR 'a' = 1;
