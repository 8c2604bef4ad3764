CREATE SEGMENT pro plan = 'pro';
