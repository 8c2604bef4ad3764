CREATE SEGMENT revenue AS
    sum(properties.revenue) FILTER (WHERE event = 'Order Completed');
