CREATE SEGMENT pro AS plan = 'pro';
