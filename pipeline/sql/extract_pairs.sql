-- Aggregate usable impressions into (query, image) pairs with their training weight.
-- weight: raw = clicks; ips = Σ 1/θ(position) over clicks; ips_dwell = the same over satisfied
-- clicks only (dwell at least $satisfied_dwell_ms, or unknown). θ is clipped below at $clip.
SELECT
    k.query_norm AS query,
    k.image_id,
    any_value(c.product_id) AS product_id,
    count(*) FILTER (WHERE k.clicked) AS clicks,
    count(*) AS impressions,
    CASE $weighting
        WHEN 'raw' THEN count(*) FILTER (WHERE k.clicked)::DOUBLE
        WHEN 'ips' THEN coalesce(sum(1.0 / greatest(p.examination, $clip)) FILTER (WHERE k.clicked), 0)
        ELSE coalesce(sum(1.0 / greatest(p.examination, $clip)) FILTER (
            WHERE k.clicked AND (k.dwell_ms IS NULL OR k.dwell_ms >= $satisfied_dwell_ms)), 0)
    END AS weight,
    min(k.event_ts) AS first_seen,
    max(k.event_ts) AS last_seen
FROM classified AS k
JOIN catalog_ids AS c USING (image_id)
JOIN propensity AS p ON p.position = least(k.position, $max_position)
WHERE k.reason IS NULL
GROUP BY k.query_norm, k.image_id
ORDER BY query, image_id
