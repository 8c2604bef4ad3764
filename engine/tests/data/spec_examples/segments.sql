CREATE SEGMENT power_buyers AS
    country = 'IN'
    AND count(*) FILTER (WHERE event = 'Order Completed'
                         AND timestamp > now() - INTERVAL '7 days') >= 3;

-- the seed example: signed up more than 3 days ago, never created a source
CREATE SEGMENT stalled_signups AS
    min(timestamp) FILTER (WHERE event = 'Signed Up') < now() - INTERVAL '3 days'
    AND count(*) FILTER (WHERE event = 'Source Created') = 0;

CREATE SEGMENT vip AS
    coalesce(sum(properties.revenue) FILTER (WHERE event = 'Order Completed'), 0) >= 1000
    OR plan IN ('pro', 'enterprise');

CREATE SEGMENT vip_stalled AS in_segment('vip') AND in_segment('stalled_signups');
