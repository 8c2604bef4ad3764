CREATE SEGMENT odd AS
    sum(event) > 0;
