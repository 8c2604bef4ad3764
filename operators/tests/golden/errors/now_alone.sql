CREATE SEGMENT always AS
    plan = 'pro' AND now();
