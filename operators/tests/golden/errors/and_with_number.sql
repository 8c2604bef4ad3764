CREATE SEGMENT odd AS
    plan = 'pro' AND count(*);
