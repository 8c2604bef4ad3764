CREATE SEGMENT buyers AS
    count(*) FILTER (event = 'Order Completed') > 0;
