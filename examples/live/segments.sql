-- Segments for trying `herald run` by hand (see README, "Live").

-- Clicked in the last minute: enters on the click, leaves 60 s later with no new event.
CREATE SEGMENT active_last_minute AS
    count(*) FILTER (WHERE event = 'Clicked' AND timestamp > now() - INTERVAL '1 minute') >= 1;

-- Added to cart, no order since, for more than 30 seconds.
CREATE SEGMENT cart_abandoners AS
    max(timestamp) FILTER (WHERE event = 'Product Added') < now() - INTERVAL '30 seconds'
    AND coalesce(max(timestamp) FILTER (WHERE event = 'Order Completed'), TIMESTAMP '1970-01-01T00:00:00Z')
        < max(timestamp) FILTER (WHERE event = 'Product Added');

CREATE SEGMENT pro AS plan = 'pro';

CREATE SEGMENT big_spenders AS
    coalesce(sum(properties.revenue) FILTER (WHERE event = 'Order Completed'), 0) >= 100;
