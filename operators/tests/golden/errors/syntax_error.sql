-- a comparison with nothing on its right
CREATE SEGMENT in_india AS
    country = ;
