CREATE SEGMENT vip AS plan = 'pro';
CREATE SEGMENT vip_buyers AS
    count(*) FILTER (WHERE in_segment('vip')) > 0;
