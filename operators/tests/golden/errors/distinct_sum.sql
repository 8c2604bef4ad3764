CREATE SEGMENT spenders AS
    sum(DISTINCT properties.revenue) > 100;
