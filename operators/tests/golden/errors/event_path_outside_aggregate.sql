CREATE SEGMENT big_order AS
    properties.revenue > 100;
