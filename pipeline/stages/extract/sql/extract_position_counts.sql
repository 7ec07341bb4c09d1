-- Usable impressions by (pair, capped position) for the propensity EM; only pairs with enough
-- impressions, seen at two or more positions, carry information about position bias. Rows come
-- in (query, image, position) order, a pair's first row flagged (`starts_pair`); the caller
-- numbers the pairs by counting those. A fixed order keeps the EM's float sums, and so the
-- weights, bit-identical; a window over the whole table (a dense_rank of every pair) would run
-- in one task on Spark, where this one runs per pair and the sort is distributed.
WITH informative AS (
    SELECT query, image_id
    FROM per_position
    GROUP BY query, image_id
    HAVING sum(impressions) >= $min_pair_impressions AND count(*) >= 2
)
SELECT row_number() OVER (PARTITION BY c.query, c.image_id ORDER BY c.position) = 1 AS starts_pair,
       c.position, c.clicks, c.impressions
FROM per_position AS c
SEMI JOIN informative AS i ON c.query = i.query AND c.image_id = i.image_id
ORDER BY c.query, c.image_id, c.position
