CREATE SEGMENT pinged AS count(*) FILTER (WHERE event = 'Ping') >= 1;
