-- horse-ledger on PostgreSQL: the roles of review (issue 29) and the rules the database itself enforces.
-- Run once as the owner of the ledger database, after `horse-ledger db upgrade` (and again after upgrades
-- that add tables):   psql -v ON_ERROR_STOP=1 -d ledger -f deploy/postgres-roles.sql
-- Then give people roles:  CREATE ROLE alice LOGIN IN ROLE horse_submitters;  GRANT horse_reviewers TO bob;
--
--   horse_submitters  read everything; insert edits (only `proposed` ones) and their events. No UPDATE: cannot
--                     approve, reject or change any status.
--   horse_trusted     submitters whose edits the trust policy (review_auto_approve_*) may approve at submission:
--                     may insert `pending` edits and supersede pending ones.
--   horse_reviewers   submitters who may also move proposed edits to pending / rejected / cancelled.
--   horse_daemon      claims and publishes (status, batches, snapshots, heads); cannot approve.
--   horse_auditors    read-only.
-- Identity: edits.submitted_by is set from current_user by a trigger; an approval must be recorded as by
-- current_user and never by the submitter (superusers included).

DO $$ BEGIN
  PERFORM 1;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'horse_auditors') THEN CREATE ROLE horse_auditors NOLOGIN; END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'horse_submitters') THEN CREATE ROLE horse_submitters NOLOGIN; END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'horse_trusted') THEN CREATE ROLE horse_trusted NOLOGIN; END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'horse_reviewers') THEN CREATE ROLE horse_reviewers NOLOGIN; END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'horse_daemon') THEN CREATE ROLE horse_daemon NOLOGIN; END IF;
END $$;

GRANT USAGE ON SCHEMA public TO horse_auditors, horse_submitters, horse_trusted, horse_reviewers, horse_daemon;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO horse_auditors, horse_submitters, horse_trusted, horse_reviewers,
  horse_daemon;

-- submitters (and so trusted and reviewers, who are granted submitters)
GRANT INSERT ON edits, events TO horse_submitters;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO horse_submitters, horse_daemon;
GRANT horse_submitters TO horse_trusted, horse_reviewers;
-- trusted: a policy-approved edit supersedes an older pending one
GRANT UPDATE (status, updated_at, supersedes_id, superseded_by_id) ON edits TO horse_trusted;
-- reviewers: decide on proposed edits (an approval supersedes an older pending edit too)
GRANT UPDATE (status, updated_at, review, reviewed_by, reviewed_at, supersedes_id, superseded_by_id) ON edits
  TO horse_reviewers;
-- the daemon: claims, heartbeats, publishes, rolls back; no review columns
GRANT UPDATE (status, updated_at, attempts, batch_id, snapshot_id, claim_token, claimed_at, heartbeat_at, last_error,
  supersedes_id, superseded_by_id) ON edits TO horse_daemon;
GRANT INSERT, UPDATE ON batches, snapshots, heads TO horse_daemon;
GRANT INSERT, DELETE ON snapshot_edits TO horse_daemon;
GRANT INSERT ON events TO horse_daemon;

CREATE OR REPLACE FUNCTION horse_edits_insert_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.submitted_by := current_user;  -- the identity cannot be typed in
  IF NEW.status <> 'proposed' AND NOT pg_has_role(current_user, 'horse_trusted', 'MEMBER') THEN
    RAISE EXCEPTION 'role % may only submit proposed edits (status %); a reviewer approves them with `horse-ledger review approve`', current_user, NEW.status
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION horse_edits_review_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF OLD.status = 'proposed' AND NEW.status IS DISTINCT FROM 'proposed' THEN
    IF NOT pg_has_role(current_user, 'horse_reviewers', 'MEMBER') THEN
      RAISE EXCEPTION 'role % is not a reviewer and cannot decide on proposed edit %', current_user, OLD.id
        USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.status IN ('pending', 'rejected') AND NEW.reviewed_by IS DISTINCT FROM current_user THEN
      RAISE EXCEPTION 'a review of edit % must be recorded as by % (reviewed_by = %)', OLD.id, current_user, NEW.reviewed_by
        USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.status = 'pending' AND OLD.submitted_by = current_user THEN
      RAISE EXCEPTION '% submitted edit % and cannot approve it; another reviewer must', current_user, OLD.id
        USING ERRCODE = 'insufficient_privilege';
    END IF;
  END IF;
  NEW.submitted_by := OLD.submitted_by;  -- never rewritten
  RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS horse_edits_insert_guard ON edits;
CREATE TRIGGER horse_edits_insert_guard BEFORE INSERT ON edits FOR EACH ROW EXECUTE FUNCTION horse_edits_insert_guard();
DROP TRIGGER IF EXISTS horse_edits_review_guard ON edits;
CREATE TRIGGER horse_edits_review_guard BEFORE UPDATE ON edits FOR EACH ROW EXECUTE FUNCTION horse_edits_review_guard();
