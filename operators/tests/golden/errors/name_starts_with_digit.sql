CREATE SEGMENT 2nd_wave AS plan = 'pro';
