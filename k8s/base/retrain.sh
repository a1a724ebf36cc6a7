#!/bin/sh
# Retrain, then promote: the one training flow behind every Graft training pod.
#
#   retrain.sh watch        the graft-train sidecar: wait for a trigger file, run once per trigger
#   retrain.sh once         the CronJob and the one-off Job: run once, exit with promote's code
#   retrain.sh multiworker  a pod of the Indexed Job: build TF_CONFIG from JOB_COMPLETION_INDEX,
#                           train with tf.distribute, then worker 0 promotes
#   retrain.sh tf-config    print the TF_CONFIG multiworker would use (for debugging)
#
# One run: `graft-train fit` exports the candidate into a private staging
# repository on the models volume (never into the served model directory, so the
# server can never load an unvetted version), then `graft-train promote` gates it
# against the version the label points at and, if it passes, publishes it as the
# next version and moves the label. Exit codes follow promote: 0 promoted,
# 1 rejected by the gate, 2 error.
#
# With GRAFT_SHADOW_URL set (graft-serve's REST address, e.g. http://graft:8501,
# serving with --shadow_fraction > 0), the candidate first becomes the canary:
# promote publishes it under the label canary (gated against the previous canary,
# or against chance), graft-serve mirrors part of stable's traffic to it, and a
# second promote waits up to GRAFT_SHADOW_WAIT_SECONDS for
# GRAFT_MIN_SHADOW_REQUESTS compared requests, then moves GRAFT_LABEL to it only
# if the held-out gate and the live one (GRAFT_MIN_AGREEMENT, GRAFT_MAX_JS) both
# pass (an unset GRAFT_MAX_JS is 1, the divergence's ceiling in bits: no limit). Rejected, the canary label rolls back (or stays, when it has no earlier
# version: a rejected canary only receives mirrored copies).
#
# Settings come from the environment (ConfigMap graft-train-env, see train.env).
set -u

repo="${GRAFT_REPO:-/models}"
model="${GRAFT_MODEL_NAME:-graft}"
# Staging and reports live on the models volume, so that promote's publish is a
# rename within one file system; the leading dot keeps them out of every model.
work="$repo/.graft"
# Container runtimes set HOSTNAME (the pod name); dash does not set it by itself.
host="${HOSTNAME:-$(cat /etc/hostname)}"

log() {
    echo "retrain[$host]: $*" >&2
}

# run_once STAGE: fit into STAGE, promote the candidate, keep the report; returns promote's code.
run_once() {
    stage="$1"
    mkdir -p "$stage" "$work/reports" || return 2
    log "training into $stage"
    graft-train fit \
        --data "$GRAFT_TRAIN_DATA" \
        --val-split "$GRAFT_VAL_SPLIT" \
        --base "$GRAFT_BASE" \
        --weights "$GRAFT_WEIGHTS" \
        --scenario "$GRAFT_SCENARIO" \
        --strategy "$GRAFT_STRATEGY" \
        --repo "$stage" \
        --model-name "$model" || { log "fit failed"; rm -rf "$stage"; return 2; }
    promote "$stage"
}

# promote STAGE: gate the single version fit exported under STAGE.
promote() {
    stage="$1"
    candidate=$(find "$stage/$model" -mindepth 1 -maxdepth 1 -type d -name '[0-9]*' | sort -n | tail -n 1)
    if [ -z "$candidate" ]; then
        log "no exported version under $stage/$model"
        return 2
    fi
    report="$work/reports/$(basename "$stage").json"
    if [ -n "${GRAFT_SHADOW_URL:-}" ]; then
        shadow_promote "$stage" "$candidate" "$report"
        return $?
    fi
    graft-train promote \
        --repo "$repo" \
        --model-name "$model" \
        --candidate "$candidate" \
        --eval-data "$GRAFT_EVAL_DATA" \
        --label "$GRAFT_LABEL" \
        --report "$report"
    code=$?
    case "$code" in
        0) log "promoted $candidate to label $GRAFT_LABEL (report $report)" ;;
        1) log "candidate rejected by the gate (report $report)" ;;
        *) log "promotion failed with code $code" ;;
    esac
    rm -rf "$stage"
    return "$code"
}

# shadow_promote STAGE CANDIDATE REPORT: canary first, then the live gate (see the top).
shadow_promote() {
    stage="$1"
    canary_report="$work/reports/$(basename "$stage")-canary.json"
    graft-train promote \
        --repo "$repo" \
        --model-name "$model" \
        --candidate "$2" \
        --eval-data "$GRAFT_EVAL_DATA" \
        --label canary \
        --report "$canary_report"
    code=$?
    rm -rf "$stage"
    if [ "$code" -ne 0 ]; then
        log "the candidate did not become the canary (code $code, report $canary_report)"
        return "$code"
    fi
    version=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["candidate"]["version"])' \
        "$canary_report") || return 2
    log "version $version is the canary; waiting for ${GRAFT_MIN_SHADOW_REQUESTS} compared requests"
    graft-train promote \
        --repo "$repo" \
        --model-name "$model" \
        --candidate "$version" \
        --eval-data "$GRAFT_EVAL_DATA" \
        --label "$GRAFT_LABEL" \
        --shadow-url "$GRAFT_SHADOW_URL" \
        --min-agreement "$GRAFT_MIN_AGREEMENT" \
        --min-shadow-requests "$GRAFT_MIN_SHADOW_REQUESTS" \
        --max-js "${GRAFT_MAX_JS:-1}" \
        --shadow-wait "${GRAFT_SHADOW_WAIT_SECONDS:-3600}" \
        --report "$3"
    code=$?
    case "$code" in
        0) log "promoted version $version to label $GRAFT_LABEL on live traffic (report $3)" ;;
        1) log "version $version rejected by the gate (report $3)"
           graft-train rollback --repo "$repo" --model-name "$model" --label canary >/dev/null \
               || log "the canary label stays on version $version (no earlier canary)" ;;
        *) log "promotion failed with code $code" ;;
    esac
    return "$code"
}

# tf_config INDEX: TF_CONFIG for worker INDEX of GRAFT_WORKERS pods behind the headless
# Service GRAFT_SERVICE (pod host names are <job name>-<index> in an Indexed Job).
tf_config() {
    hosts=""
    i=0
    while [ "$i" -lt "$GRAFT_WORKERS" ]; do
        hosts="$hosts${hosts:+,}\"$GRAFT_JOB_NAME-$i.$GRAFT_SERVICE:$GRAFT_WORKER_PORT\""
        i=$((i + 1))
    done
    printf '{"cluster":{"worker":[%s]},"task":{"type":"worker","index":%d}}' "$hosts" "$1"
}

mode="${1:-once}"
case "$mode" in
    once)
        run_once "$work/staging/run-$(date -u +%Y%m%dT%H%M%SZ)-$host"
        exit $?
        ;;
    watch)
        trigger_dir="${GRAFT_TRIGGER_DIR:-$work/triggers}"
        mkdir -p "$trigger_dir"
        claim="$trigger_dir/claimed-$host"
        # A run cut short (SIGTERM from a rollout, a restart) hands its trigger back,
        # so that a sidecar that stays up picks it up again.
        if [ -e "$claim" ]; then
            mv "$claim" "$trigger_dir/retrain"
        fi
        trap 'mv "$claim" "$trigger_dir/retrain" 2>/dev/null; exit 143' TERM INT
        log "waiting for $trigger_dir/retrain"
        while :; do
            # rename() is atomic: of all the replicas' sidecars polling the shared
            # volume, exactly one claims a trigger.
            if mv "$trigger_dir/retrain" "$claim" 2>/dev/null; then
                run_once "$work/staging/run-$(date -u +%Y%m%dT%H%M%SZ)-$host"
                rm -f "$claim"
            fi
            sleep "${GRAFT_TRIGGER_POLL_SECONDS:-30}"
        done
        ;;
    tf-config)
        tf_config "${JOB_COMPLETION_INDEX:?JOB_COMPLETION_INDEX is set by an Indexed Job}"
        echo
        ;;
    multiworker)
        index="${JOB_COMPLETION_INDEX:?JOB_COMPLETION_INDEX is set by an Indexed Job}"
        TF_CONFIG=$(tf_config "$index")
        export TF_CONFIG
        log "TF_CONFIG=$TF_CONFIG"
        # Every worker must name the same staging repository: the job's uid makes it unique.
        stage="$work/staging/$GRAFT_JOB_NAME-$GRAFT_JOB_UID"
        mkdir -p "$stage" || exit 2
        # TF_CONFIG's worker 0 is the chief: it alone writes the export, so it alone promotes.
        graft-train fit \
            --data "$GRAFT_TRAIN_DATA" \
            --val-split "$GRAFT_VAL_SPLIT" \
            --base "$GRAFT_BASE" \
            --weights "$GRAFT_WEIGHTS" \
            --scenario "$GRAFT_SCENARIO" \
            --strategy multiworker \
            --repo "$stage" \
            --model-name "$model" || exit 2
        if [ "$index" -eq 0 ]; then
            promote "$stage"
            exit $?
        fi
        exit 0
        ;;
    *)
        log "unknown mode $mode (use watch, once, multiworker or tf-config)"
        exit 2
        ;;
esac
