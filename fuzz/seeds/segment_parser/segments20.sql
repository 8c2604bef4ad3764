-- Twenty segments for the replay throughput run: the spec's four examples plus sixteen
-- of the shapes analysts write most (windows, lifetime aggregates, traits, lists of
-- values, segment references, experiment buckets).

CREATE SEGMENT power_buyers AS
    country = 'IN'
    AND count(*) FILTER (WHERE event = 'Order Completed'
                         AND timestamp > now() - INTERVAL '7 days') >= 3;

CREATE SEGMENT stalled_signups AS
    min(timestamp) FILTER (WHERE event = 'Signed Up') < now() - INTERVAL '3 days'
    AND count(*) FILTER (WHERE event = 'Source Created') = 0;

CREATE SEGMENT vip AS
    coalesce(sum(properties.revenue) FILTER (WHERE event = 'Order Completed'), 0) >= 1000
    OR plan IN ('pro', 'enterprise');

CREATE SEGMENT vip_stalled AS in_segment('vip') AND in_segment('stalled_signups');

CREATE SEGMENT buyers AS count(*) FILTER (WHERE event = 'Order Completed') >= 1;

CREATE SEGMENT repeat_buyers AS count(*) FILTER (WHERE event = 'Order Completed') >= 2;

CREATE SEGMENT cart_abandoners AS
    count(*) FILTER (WHERE event = 'Product Added' AND timestamp > now() - INTERVAL '24 hours') > 0
    AND count(*) FILTER (WHERE event = 'Order Completed' AND timestamp > now() - INTERVAL '24 hours') = 0;

CREATE SEGMENT browsers_7d AS
    count(*) FILTER (WHERE event = 'Product Viewed' AND timestamp > now() - INTERVAL '7 days') >= 5;

CREATE SEGMENT active_30d AS last(timestamp) > now() - INTERVAL '30 days';

CREATE SEGMENT dormant AS last(timestamp) < now() - INTERVAL '14 days';

CREATE SEGMENT high_aov AS avg(properties.revenue) FILTER (WHERE event = 'Order Completed') > 150;

CREATE SEGMENT big_spender_30d AS
    sum(properties.revenue) FILTER (WHERE event = 'Order Completed'
                                    AND timestamp > now() - INTERVAL '30 days') > 500;

CREATE SEGMENT window_shoppers AS
    count(DISTINCT properties.product_id) FILTER (WHERE event = 'Product Viewed') >= 10
    AND NOT in_segment('buyers');

CREATE SEGMENT in_market AS
    country IN ('US', 'IN', 'DE') AND in_segment('browsers_7d');

CREATE SEGMENT free_plan_engaged AS
    plan = 'free' AND count(*) FILTER (WHERE type = 'page' AND timestamp > now() - INTERVAL '3 days') >= 3;

CREATE SEGMENT first_order_recent AS
    min(timestamp) FILTER (WHERE event = 'Order Completed') > now() - INTERVAL '7 days';

CREATE SEGMENT gmail_users AS email LIKE '%@gmail.com';

CREATE SEGMENT experiment_b AS hash_bucket(user_id, 'checkout-test', 2) = 1 AND in_segment('buyers');

CREATE SEGMENT unknown_country AS country IS NULL AND count(*) >= 1;

CREATE SEGMENT checkout_dropoff AS
    max(timestamp) FILTER (WHERE event = 'Checkout Started')
        > coalesce(max(timestamp) FILTER (WHERE event = 'Order Completed'), TIMESTAMP '1970-01-01T00:00:00Z')
    AND max(timestamp) FILTER (WHERE event = 'Checkout Started') < now() - INTERVAL '1 hour';
