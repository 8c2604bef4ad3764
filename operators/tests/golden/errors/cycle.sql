CREATE SEGMENT a AS in_segment('b');
CREATE SEGMENT b AS plan = 'pro' AND in_segment('a');
