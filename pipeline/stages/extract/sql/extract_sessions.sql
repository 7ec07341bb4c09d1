-- Sessions that need a second look, from one aggregation of the log per session:
-- bot: activity no shopper produces (too many impressions per minute or per session, or a
--   click-through rate above the threshold over enough impressions); impressions per minute are
--   counted only for sessions with more impressions in all than the per-minute limit, since no
--   other session can exceed it;
-- repeats_a_row: the session may hold two rows with the same seven columns: two of its rows share
--   (event_ts, position), as any two copies of a row do (a cheap superset test: hashing the string
--   columns too cost seconds at 100M rows). Exact duplicates share their session, so every
--   duplicate impression is in such a session; the scan marks those sessions' rows
--   `maybe_duplicate` and pipeline.extract confirms them on all seven columns, so neither a hash
--   collision nor a shared (event_ts, position) ever quarantines a row.
WITH per_session AS MATERIALIZED (
    SELECT
        session_id,
        count(*) AS impressions,
        count(*) FILTER (WHERE clicked) AS clicks,
        array_length(list_distinct(list(hash(event_ts, position)))) < count(*)
            AS repeats_a_row
    FROM events_raw
    WHERE session_id IS NOT NULL
    GROUP BY session_id
),
busy AS (
    SELECT session_id FROM per_session WHERE $enabled AND impressions > $max_per_minute
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
),
flagged AS (
    SELECT
        s.session_id, s.impressions, s.clicks, m.peak_per_minute, s.repeats_a_row,
        $enabled AND (
            s.impressions > $max_per_session
            OR coalesce(m.peak_per_minute > $max_per_minute, false)
            OR (s.impressions >= $min_for_ctr AND s.clicks > $max_ctr * s.impressions)
        ) AS bot
    FROM per_session AS s
    LEFT JOIN per_minute AS m USING (session_id)
)
SELECT * FROM flagged WHERE bot OR repeats_a_row
