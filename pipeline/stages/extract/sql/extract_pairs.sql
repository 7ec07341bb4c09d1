-- Aggregate the usable-impression statistics into (query, image) pairs with their training weight.
-- weight: raw = clicks; ips = Σ 1/θ(position) over clicks; ips_dwell = the same over satisfied
-- clicks only. θ is clipped below at $clip. Counts are summed per capped position first (exact
-- integers), and the per-position terms are added in position order, so the weight has the same
-- bits whatever the thread count or scheduling. Images no longer in the catalog (possible only
-- for statistics kept from earlier incremental runs) are left out and counted by the caller.
WITH per_position AS (
    SELECT query, image_id, least(position, $max_position) AS position,
           sum(clicks)::BIGINT AS clicks, sum(satisfied_clicks)::BIGINT AS satisfied_clicks,
           sum(impressions)::BIGINT AS impressions, min(first_seen) AS first_seen, max(last_seen) AS last_seen
    FROM stats
    GROUP BY ALL
)
SELECT
    s.query,
    s.image_id,
    any_value(c.product_id) AS product_id,
    sum(s.clicks)::BIGINT AS clicks,
    sum(s.impressions)::BIGINT AS impressions,
    CASE $weighting
        WHEN 'raw' THEN sum(s.clicks)::DOUBLE
        WHEN 'ips' THEN list_sum(list(s.clicks / greatest(p.examination, $clip) ORDER BY s.position))
        ELSE list_sum(list(s.satisfied_clicks / greatest(p.examination, $clip) ORDER BY s.position))
    END AS weight,
    min(s.first_seen) AS first_seen,
    max(s.last_seen) AS last_seen
FROM per_position AS s
JOIN catalog_ids AS c USING (image_id)
JOIN propensity AS p ON p.position = s.position
GROUP BY s.query, s.image_id
ORDER BY query, image_id
