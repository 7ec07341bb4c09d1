-- Aggregate the per-position statistics into (query, image) pairs with their training weight.
-- weight: raw = clicks; ips = Σ 1/θ(position) over clicks; ips_dwell = the same over satisfied
-- clicks only. θ is clipped below at $clip. Each pair's terms are summed as DECIMAL (exact, so the
-- weight has the same bits whatever the thread count or the order rows arrive in; 1/θ is rounded
-- to 12 decimals first) rather than collected into a list per pair and summed in position order,
-- which held a list for each of the tens of millions of pairs of a long-tail log. Images no
-- longer in the catalog (possible only for statistics kept from earlier incremental runs) are
-- left out and counted by the caller.
SELECT
    s.query,
    s.image_id,
    any_value(c.product_id) AS product_id,
    sum(s.clicks)::BIGINT AS clicks,
    sum(s.impressions)::BIGINT AS impressions,
    CASE $weighting
        WHEN 'raw' THEN sum(s.clicks)::DOUBLE
        WHEN 'ips' THEN sum(s.clicks * (1.0 / greatest(p.examination, $clip))::DECIMAL(18, 12))::DOUBLE
        ELSE sum(s.satisfied_clicks * (1.0 / greatest(p.examination, $clip))::DECIMAL(18, 12))::DOUBLE
    END AS weight,
    min(s.first_seen) AS first_seen,
    max(s.last_seen) AS last_seen
FROM per_position AS s
JOIN catalog_ids AS c USING (image_id)
JOIN propensity AS p ON p.position = s.position
GROUP BY s.query, s.image_id
ORDER BY query, image_id
