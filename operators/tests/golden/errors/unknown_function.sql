CREATE SEGMENT frequent AS
    cnt(*) FILTER (WHERE event = 'Order Completed') >= 3;
