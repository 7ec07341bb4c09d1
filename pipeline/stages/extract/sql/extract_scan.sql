-- Usable impressions summed per (day, query, image, position): all the propensity EM and the pair
-- weights need, and what incremental mode keeps between runs ($by_day; otherwise day is NULL and
-- the groups are per (query, image, position), far fewer). A satisfied click has a dwell of at
-- least $satisfied_dwell_ms, or an unknown dwell. The quarantined rows are read by a second,
-- filtered pass (extract_flagged.sql): carrying them through this aggregation (a list per group)
-- held a list state in each of the tens of millions of groups of a long-tail log and ran out of
-- memory at 100M impressions.
SELECT
    CASE WHEN $by_day THEN CAST(event_ts AS DATE) END AS day,
    query_norm AS query,
    image_id,
    position,
    count(*) FILTER (WHERE clicked) AS clicks,
    count(*) FILTER (WHERE clicked AND (dwell_ms IS NULL OR dwell_ms >= $satisfied_dwell_ms)) AS satisfied_clicks,
    count(*) AS impressions,
    min(event_ts) AS first_seen,
    max(event_ts) AS last_seen
FROM classified
WHERE reason IS NULL
GROUP BY ALL
