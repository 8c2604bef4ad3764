CREATE SEGMENT big_spenders AS
    count(sum(properties.revenue)) > 1;
