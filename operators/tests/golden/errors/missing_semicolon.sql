CREATE SEGMENT pro AS plan = 'pro'
CREATE SEGMENT free AS plan = 'free';
