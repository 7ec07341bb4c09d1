-- Usable impressions summed per (day, query, image, position): all the propensity EM and the pair
-- weights need, and what incremental mode keeps between runs. A satisfied click has a dwell of at
-- least $satisfied_dwell_ms, or an unknown dwell.
SELECT
    CAST(event_ts AS DATE) AS day,
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
