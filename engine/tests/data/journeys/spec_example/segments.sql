CREATE SEGMENT shoppers AS count(*) FILTER (WHERE event = 'Product Added' AND timestamp > now() - INTERVAL '7 days') >= 1;
CREATE SEGMENT vip AS coalesce(sum(properties.revenue) FILTER (WHERE event = 'Order Completed'), 0) >= 1000 OR plan IN ('pro', 'enterprise');
