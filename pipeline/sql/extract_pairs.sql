-- Aggregate the usable-impression statistics into (query, image) pairs with their training weight.
-- weight: raw = clicks; ips = Σ 1/θ(position) over clicks; ips_dwell = the same over satisfied
-- clicks only. θ is clipped below at $clip. Images no longer in the catalog (possible only for
-- statistics kept from earlier incremental runs) are left out and counted by the caller.
SELECT
    s.query,
    s.image_id,
    any_value(c.product_id) AS product_id,
    sum(s.clicks)::BIGINT AS clicks,
    sum(s.impressions)::BIGINT AS impressions,
    CASE $weighting
        WHEN 'raw' THEN sum(s.clicks)::DOUBLE
        WHEN 'ips' THEN sum(s.clicks / greatest(p.examination, $clip))
        ELSE sum(s.satisfied_clicks / greatest(p.examination, $clip))
    END AS weight,
    min(s.first_seen) AS first_seen,
    max(s.last_seen) AS last_seen
FROM stats AS s
JOIN catalog_ids AS c USING (image_id)
JOIN propensity AS p ON p.position = least(s.position, $max_position)
GROUP BY s.query, s.image_id
ORDER BY query, image_id
