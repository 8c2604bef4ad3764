CREATE SEGMENT signed_up AS
    event = 'Signed Up';
