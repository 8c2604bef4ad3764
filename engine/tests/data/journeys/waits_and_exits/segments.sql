-- Active: any event in the last two days.
CREATE SEGMENT active AS count(*) FILTER (WHERE timestamp > now() - INTERVAL '2 days') >= 1;
-- Written by the onboarding journey's update_trait.
CREATE SEGMENT onboarded AS onboarded = TRUE;
