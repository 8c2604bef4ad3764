CREATE SEGMENT gmail AS
    email ILIKE '%@gmail.com';
