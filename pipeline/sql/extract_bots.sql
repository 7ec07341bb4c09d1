-- Sessions whose activity no shopper produces: too many impressions per minute or per session,
-- or a click-through rate above the threshold over enough impressions. Impressions per minute
-- are counted only for sessions with more impressions in all than the per-minute limit (no other
-- session can exceed it), so the big aggregation is one row per session.
WITH per_session AS (
    SELECT session_id, count(*) AS impressions, count(*) FILTER (WHERE clicked) AS clicks
    FROM events_raw
    WHERE $enabled AND session_id IS NOT NULL
    GROUP BY session_id
),
busy AS (
    SELECT session_id FROM per_session WHERE impressions > $max_per_minute
),
per_minute AS (
    SELECT session_id, max(n) AS peak_per_minute
    FROM (
        SELECT session_id, date_trunc('minute', event_ts) AS minute, count(*) AS n
        FROM events_raw
        SEMI JOIN busy USING (session_id)
        WHERE event_ts IS NOT NULL
        GROUP BY session_id, minute
    )
    GROUP BY session_id
)
SELECT s.session_id, s.impressions, s.clicks, m.peak_per_minute
FROM per_session AS s
LEFT JOIN per_minute AS m USING (session_id)
WHERE s.impressions > $max_per_session
    OR m.peak_per_minute > $max_per_minute
    OR (s.impressions >= $min_for_ctr AND s.clicks > $max_ctr * s.impressions)
