-- Herald's e-commerce example segments.
--
-- Runs on the data `ecommerce-gen` writes: events.jsonl (Segment-spec messages),
-- profiles.parquet (traits plan, country, lifetime_value, signup_at, is_employee) and
-- beta.csv. `ecommerce-gen` also copies this file next to them, because the relative
-- path in `FROM CSV 'beta.csv'` is resolved against the segment file's directory.

-- The spec's four examples, verbatim.
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

-- Put something in the cart in the last day, bought nothing in the last day.
CREATE SEGMENT cart_abandoners AS
    count(*) FILTER (WHERE event = 'Product Added'
                     AND timestamp > now() - INTERVAL '24 hours') > 0
    AND count(*) FILTER (WHERE event = 'Order Completed'
                         AND timestamp > now() - INTERVAL '24 hours') = 0;

-- Seen before, but not for two weeks. Users are keyed by userId, else anonymousId, with
-- no identity stitching, so the anonymous browsing that preceded a signup is a user of
-- its own here, and usually a dormant one.
CREATE SEGMENT dormant AS
    last(timestamp) < now() - INTERVAL '14 days';

-- Big baskets on average.
CREATE SEGMENT high_aov AS
    avg(properties.revenue) FILTER (WHERE event = 'Order Completed') > 150;

-- Signed up in the last week, by the signup_at trait (CRM snapshot or signup identify).
CREATE SEGMENT new_users_7d AS
    signup_at > now() - INTERVAL '7 days';

-- A static list; the path is relative to this file's directory.
CREATE SEGMENT beta_testers FROM CSV 'beta.csv';

CREATE SEGMENT employees AS
    is_employee = TRUE OR email LIKE '%@herald.dev';

-- Look at many different products, never buy.
CREATE SEGMENT window_shoppers AS
    count(DISTINCT properties.product_id) FILTER (WHERE event = 'Product Viewed'
                                                  AND timestamp > now() - INTERVAL '7 days') >= 5
    AND count(*) FILTER (WHERE event = 'Order Completed') = 0;

-- Checkout experiment: half of the customers, staff excluded, get variant B.
CREATE SEGMENT checkout_variant_b AS
    hash_bucket(user_id, 'checkout-2026-03', 2) = 1
    AND NOT in_segment('employees');

-- Beta testers who are buying: early feedback on the new checkout.
CREATE SEGMENT beta_buyers AS
    in_segment('beta_testers')
    AND count(*) FILTER (WHERE event = 'Order Completed') >= 1;

-- Paying customers in Europe with a recent high-value order.
CREATE SEGMENT eu_recent_big_spenders AS
    country IN ('DE', 'FR', 'GB')
    AND max(properties.revenue) FILTER (WHERE event = 'Order Completed'
                                        AND timestamp > now() - INTERVAL '30 days') >= 300
    AND coalesce(lifetime_value, 0) + coalesce(sum(properties.revenue) FILTER (WHERE event = 'Order Completed'), 0) > 500;
