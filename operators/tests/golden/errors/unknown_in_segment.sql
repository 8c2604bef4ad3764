CREATE SEGMENT vip AS plan = 'pro';
CREATE SEGMENT vip_lapsed AS in_segment('vip') AND in_segment('lapsed');
