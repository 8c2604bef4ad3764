CREATE SEGMENT VIP AS plan = 'pro';
