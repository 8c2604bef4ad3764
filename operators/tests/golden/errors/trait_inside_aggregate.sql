CREATE SEGMENT indian_buyers AS
    count(*) FILTER (WHERE event = 'Order Completed' AND country = 'IN') > 0;
