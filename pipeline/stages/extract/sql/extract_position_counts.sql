-- Usable impressions by (pair, capped position) for the propensity EM; only pairs with enough
-- impressions, seen at two or more positions, carry information about position bias.
WITH informative AS (
    SELECT query, image_id, dense_rank() OVER (ORDER BY query, image_id) - 1 AS pair
    FROM per_position
    GROUP BY query, image_id
    HAVING sum(impressions) >= $min_pair_impressions AND count(*) >= 2
)
SELECT i.pair, c.position, c.clicks, c.impressions
FROM per_position AS c
JOIN informative AS i USING (query, image_id)
ORDER BY i.pair, c.position  -- a fixed order keeps the EM's float sums, and so the weights, bit-identical
