CREATE SEGMENT experiment AS
    hash_bucket(user_id, 'exp-42', 0) < 10;
