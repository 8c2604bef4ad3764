CREATE SEGMENT anyone AS count(*) >= 1;
