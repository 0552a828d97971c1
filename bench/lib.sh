# Shared helpers of bench/run.sh and bench/profile.sh (sourced, not run).

# wait_http URL [SECONDS]: bounded polling (a deadline, whatever each probe costs) until URL
# answers 200. Default 20 s.
wait_http() {
    local url=$1 end=$((SECONDS + ${2:-20}))
    while ((SECONDS < end)); do
        [[ $(curl -sk -o /dev/null -w '%{http_code}' --max-time 2 "$url" 2>/dev/null) == 200 ]] && return 0
        sleep 0.1
    done
    return 1
}
