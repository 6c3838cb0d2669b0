#!/usr/bin/env bash
# Disk use of Postgres per record and per session, and what a purge gives back.
#   tests/bench/disk-usage.sh            (SESSIONS=1000 RECORDS_PER_SESSION=1000 RECORD_BYTES=100)
# Creates its own database (the current schema, migrated by `sessions-worker`), fills it with
# rows of the shape the append route writes (bodies of RECORD_BYTES bytes; `out` records without
# part ids, `in` records with one, kept in `record_part_ids` too), and prints table and index bytes
# per record (both tables together); then deletes half
# of the sessions as the retention purge does and measures, in two copies of the same data, the
# space a refill of the same size needs with and without a VACUUM in between, and what VACUUM FULL
# returns to the OS. Removes its databases at the end. Needs a release build
# (`cargo build --release`; SESSIONS_WORKER=<path> uses another build) and a local Postgres.
set -euo pipefail
cd "$(dirname "$0")/../.."
server=${POSTGRES_SERVER:-postgres://postgres@127.0.0.1:5432}
sessions=${SESSIONS:-1000}
per_session=${RECORDS_PER_SESSION:-1000}
record_bytes=${RECORD_BYTES:-100}
base=sessions_disk_$(date +%s)

q() { psql "$server/$1" -qAtc "$2"; }
size() { q "$1" "SELECT pg_relation_size('records') + pg_relation_size('record_part_ids') || ' ' ||
  pg_indexes_size('records') + pg_indexes_size('record_part_ids') || ' ' || pg_total_relation_size('sessions')"; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

fill() { # database, first session number, session count
  q "$1" "INSERT INTO sessions (id, friendly_id, environment_id, external_id, session_type,
      task_identifier, trigger_config, tags, metadata, created_at, updated_at, next_seq_in, next_seq_out)
    SELECT md5('s' || n)::uuid, 'session_' || substr(md5('f' || n), 1, 21), md5('env')::uuid,
      'chat-' || n, 'chat.agent', 'agent', '{\"basePayload\": {\"chatId\": \"chat\"}}'::jsonb,
      '[]'::jsonb, NULL, now(), now(), $per_session / 2, $per_session / 2
    FROM generate_series($2, $2 + $3 - 1) AS n"
  q "$1" "INSERT INTO records (session_id, io, seq_num, environment_id, part_id, body,
      body_fingerprint, command_id, created_at, headers, body_is_envelope)
    SELECT md5('s' || n)::uuid, CASE WHEN g % 2 = 0 THEN 'out' ELSE 'in' END, g / 2,
      md5('env')::uuid, CASE WHEN g % 2 = 0 THEN NULL ELSE 'part-' || n || '-' || g END,
      repeat('x', $record_bytes), encode(sha256(('b' || n || g)::bytea), 'hex'),
      gen_random_uuid(), now(), NULL, false
    FROM generate_series($2, $2 + $3 - 1) AS n, generate_series(0, $per_session - 1) AS g"
  q "$1" "INSERT INTO record_part_ids (session_id, stream, part_id, seq_num)
    SELECT md5('s' || n)::uuid, 'in', 'part-' || n || '-' || g, g / 2
    FROM generate_series($2, $2 + $3 - 1) AS n, generate_series(0, $per_session - 1) AS g
    WHERE g % 2 = 1"
}

purge_half() { # database: deletes the first half of the sessions and their records
  q "$1" "DELETE FROM record_part_ids WHERE session_id IN (SELECT md5('s' || n)::uuid FROM generate_series(0, $sessions / 2 - 1) AS n)"
  q "$1" "DELETE FROM records WHERE session_id IN (SELECT md5('s' || n)::uuid FROM generate_series(0, $sessions / 2 - 1) AS n)"
  q "$1" "DELETE FROM sessions WHERE id IN (SELECT md5('s' || n)::uuid FROM generate_series(0, $sessions / 2 - 1) AS n)"
}

for db in "$base" "${base}_novacuum"; do
  RUST_LOG=warn DATABASE_URL="$server/$db" "${SESSIONS_WORKER:-target/release/sessions-worker}" admin dead-letters list >/dev/null
  q "$db" "ALTER TABLE records SET (autovacuum_enabled = false)"
  q "$db" "ALTER TABLE record_part_ids SET (autovacuum_enabled = false)"
  fill "$db" 0 "$sessions"
  q "$db" "ANALYZE"
done
records=$((sessions * per_session))
read -r table indexes sessions_bytes <<<"$(size "$base")"
echo "records: $records ($sessions sessions × $per_session, bodies of $record_bytes bytes, half with part ids)"
echo "  table $(mib "$table"), indexes $(mib "$indexes") → $(( (table + indexes) / records )) bytes per record ($(( table / records )) table + $(( indexes / records )) indexes)"
echo "  per million appends: $(mib $(( (table + indexes) * 1000000 / records )))"
echo "  sessions table: $(( sessions_bytes / sessions )) bytes per session (with its indexes)"
q "$base" "SELECT '  index ' || indexrelname || ': ' || pg_relation_size(indexrelid) / $records || ' bytes per record' FROM pg_stat_user_indexes WHERE relname IN ('records', 'record_part_ids') ORDER BY 1"

echo "purge half of the sessions, then refill with as many new ones:"
for db in "$base" "${base}_novacuum"; do
  purge_half "$db"
  read -r table_purged indexes_purged _ <<<"$(size "$db")"
  if [ "$db" = "$base" ]; then
    q "$db" "VACUUM records"; q "$db" "VACUUM record_part_ids"; q "$db" "VACUUM sessions"; label="with VACUUM after the purge"
  else
    label="without VACUUM"
  fi
  fill "$db" "$sessions" $((sessions / 2))
  read -r table_refilled indexes_refilled _ <<<"$(size "$db")"
  echo "  $label: after the purge $(mib $((table_purged + indexes_purged))) (was $(mib $((table + indexes)))), after the refill $(mib $((table_refilled + indexes_refilled)))"
done
q "$base" "VACUUM FULL records"
q "$base" "VACUUM FULL record_part_ids"
read -r table_full indexes_full _ <<<"$(size "$base")"
echo "  VACUUM FULL after the refill (with VACUUM): $(mib $((table_full + indexes_full)))"

for db in "$base" "${base}_novacuum"; do
  psql "$server/postgres" -qAtc "DROP DATABASE \"$db\""
done
