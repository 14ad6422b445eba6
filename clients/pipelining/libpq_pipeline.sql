-- libpq pipeline mode, driven by psql 18 (\startpipeline ... \endpipeline uses
-- PQenterPipelineMode / PQsendQueryParams / PQpipelineSync): BEGIN, set_org, the query and
-- COMMIT in one round trip. In C the same four PQsendQueryParams calls and one
-- PQpipelineSync; after a failed set_org every later result is PGRES_PIPELINE_ABORTED.
--
--   psql (18) "host=127.0.0.1 user=app dbname=app" -f libpq_pipeline.sql
\startpipeline
BEGIN \bind \sendpipeline
SELECT tenancy.set_org($1) \bind '5e000000-0000-4000-8000-000000000001' \sendpipeline
SELECT body FROM public.notes ORDER BY id \bind \sendpipeline
COMMIT \bind \sendpipeline
\endpipeline
-- A failed set_org: the rest of the pipeline is aborted, the query returns no rows.
\startpipeline
BEGIN \bind \sendpipeline
SELECT tenancy.set_org($1) \bind 'not-a-tenant' \sendpipeline
SELECT body FROM public.notes ORDER BY id \bind \sendpipeline
COMMIT \bind \sendpipeline
\endpipeline
