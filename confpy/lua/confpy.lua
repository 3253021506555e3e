-- confpy live mode: upstream members live in a shared dictionary, pushed by confpy (or people)
-- through a small admin API, and a balancer picks from them: smooth weighted round-robin (nginx's
-- default), or least_conn, ip_hash, hash KEY [consistent], random when the upstream's balance says so.
-- Member changes need no reload. The members confpy last pushed are also in a state file that
-- confpy writes atomically before every push; nginx loads it at start and on reload, so a
-- restarted nginx serves the last known members before confpy says anything.

local cjson = require "cjson.safe"
local balancer = require "ngx.balancer"
local bit = require "bit"

local _M = { _VERSION = "0.1.0" }

local DICT = "confpy_upstreams"
local MAX_TRIES = 3             -- a request tries at most this many members (connect failures)
local DEFAULT_MAX_FAILS = 1     -- nginx's defaults for a `server` line
local DEFAULT_FAIL_TIMEOUT = 10
-- What balancer_by_lua returns when it has no member for a try: nginx's NGX_BUSY, which its own
-- balancer returns then too ("no live upstreams"; the client gets a 502). An HTTP status passed to
-- ngx.exit here becomes a 500 on stock nginx (only OpenResty's patched core forwards it).
local NO_LIVE_UPSTREAMS = -3

local boot_members = nil        -- read from the state file by init(), in the master
local token = nil               -- the admin API's token, read by init() (as root) from confpy's token file
local known = {}                -- upstream names this configuration defines
local cache = {}                -- per worker: name -> { version, peers, balance } (peers keep SWRR state)
local active = {}               -- per worker: member key -> requests in flight (least_conn)
local METHODS = { round_robin = true, least_conn = true, ip_hash = true, hash = true, random = true }

local function shared()
    return ngx.shared[DICT]
end

-- Validation ---------------------------------------------------------------------------------

local function valid_ipv4(host)
    local a, b, c, d = host:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
    if not a then return false end
    for _, part in ipairs({ a, b, c, d }) do
        if tonumber(part) > 255 then return false end
    end
    return true
end

local function valid_ipv6(host)
    return host:find(":", 1, true) ~= nil and host:match("^[%x:%.]+$") ~= nil and #host <= 45
end

-- Returns a clean member list, or nil and what is wrong with it.
local function check_members(members)
    if type(members) ~= "table" or #members == 0 then
        return nil, "members must be a non-empty list of {host, port, weight}"
    end
    local clean, seen = {}, {}
    for i, m in ipairs(members) do
        if type(m) ~= "table" then return nil, "member " .. i .. " is not an object" end
        local host, port, weight = m.host, m.port, m.weight or 1
        if type(host) ~= "string" or not (valid_ipv4(host) or valid_ipv6(host)) then
            return nil, "member " .. i .. ": host must be an IPv4 or IPv6 address"
        end
        if type(port) ~= "number" or port % 1 ~= 0 or port < 1 or port > 65535 then
            return nil, "member " .. i .. ": port must be an integer from 1 to 65535"
        end
        if type(weight) ~= "number" or weight % 1 ~= 0 or weight < 1 then
            return nil, "member " .. i .. ": weight must be a positive integer"
        end
        local max_fails, fail_timeout = m.max_fails or DEFAULT_MAX_FAILS, m.fail_timeout or DEFAULT_FAIL_TIMEOUT
        if type(max_fails) ~= "number" or max_fails % 1 ~= 0 or max_fails < 0 then
            return nil, "member " .. i .. ": max_fails must be a non-negative integer"
        end
        if type(fail_timeout) ~= "number" or fail_timeout <= 0 then
            return nil, "member " .. i .. ": fail_timeout must be a positive number of seconds"
        end
        if m.backup ~= nil and type(m.backup) ~= "boolean" then return nil, "member " .. i .. ": backup must be true or false" end
        if m.down ~= nil and type(m.down) ~= "boolean" then return nil, "member " .. i .. ": down must be true or false" end
        local key = host .. "|" .. port
        if seen[key] then return nil, "member " .. i .. " is listed twice" end
        seen[key] = true
        clean[#clean + 1] = { host = host, port = port, weight = weight, max_fails = max_fails,
                              fail_timeout = fail_timeout, backup = m.backup == true, down = m.down == true }
    end
    return clean
end

-- An upstream's balancing method: nil is round-robin; a hash key is nginx variables only ($a$b).
local function check_balance(b)
    if b == nil then return { method = "round_robin" } end
    if type(b) ~= "table" or not METHODS[b.method] then
        return nil, "balance.method must be round_robin, least_conn, ip_hash, hash or random"
    end
    if b.method == "hash" then
        if type(b.key) ~= "string" or b.key:sub(1, 1) ~= "$" or b.key:gsub("%$[%a_][%w_]*", "") ~= "" then
            return nil, "balance.key must be nginx variables, e.g. $remote_addr or $host$request_uri"
        end
        if b.consistent ~= nil and type(b.consistent) ~= "boolean" then return nil, "balance.consistent must be true or false" end
        return { method = "hash", key = b.key, consistent = b.consistent == true }
    end
    return { method = b.method }
end

-- Storage: "m:NAME" holds the JSON member list, "b:NAME" the balancing method, "v:NAME" the
-- version (checked on every request, and written last).

local function store(name, version, members, balance)
    local dict = shared()
    local ok, err = dict:set("m:" .. name, cjson.encode(members))
    if not ok then return nil, err end
    if balance ~= nil then
        ok, err = dict:set("b:" .. name, cjson.encode(balance))
        if not ok then return nil, err end
    end
    -- "g:NAME" counts stores: no client sets it, so members stored under a version someone copied
    -- (confpy's own, say) still refresh every worker's cache, and so does confpy's restore after.
    ok, err = dict:incr("g:" .. name, 1, 0)
    if not ok then return nil, err end
    return dict:set("v:" .. name, version)
end

local function load(name)
    local dict = shared()
    local raw = dict:get("m:" .. name)
    if not raw then return nil end
    return dict:get("v:" .. name), cjson.decode(raw)
end

-- Phases -------------------------------------------------------------------------------------

-- init_by_lua: remember the upstream names and read the rendered state (the master runs this
-- as root before forking workers, at start and at every reload).
function _M.init(state_file, names, token_file)
    for _, name in ipairs(names) do known[name] = true end
    if token_file then
        local t = io.open(token_file, "r")
        if t then
            local text = (t:read("*a") or ""):gsub("%s+$", "")
            t:close()
            if #text >= 32 then token = text end
        end
        if not token then
            ngx.log(ngx.ERR, "confpy: no usable admin token in ", token_file, "; the admin API refuses every request")
        end
    end
    local f = io.open(state_file, "r")
    if not f then return end
    local data = cjson.decode(f:read("*a") or "")
    f:close()
    if type(data) == "table" and type(data.upstreams) == "table" then
        boot_members = data.upstreams
    end
end

-- init_worker_by_lua: load the state file's members into the shared dictionary where it does
-- not already hold that version (the dictionary survives reloads; a fresh start has it empty).
function _M.init_worker()
    if not boot_members then return end
    for name, entry in pairs(boot_members) do
        if known[name] and type(entry) == "table" then
            local members = check_members(entry.members)
            local balance = check_balance(entry.balance)
            local version = load(name)
            if members and balance and version ~= entry.version then
                store(name, tostring(entry.version), members, balance)
            end
        end
    end
end

local function peers_for(name)
    local dict = shared()
    local version = dict:get("v:" .. name)
    if not version then return nil end
    local cached = cache[name]
    local generation = dict:get("g:" .. name)
    if cached and cached.version == version and cached.generation == generation then return cached end
    local members = cjson.decode(dict:get("m:" .. name) or "")
    if type(members) ~= "table" then return nil end
    local peers = {}
    for i, m in ipairs(members) do
        peers[i] = { host = m.host, port = m.port, weight = m.weight, current = 0, key = name .. "|" .. m.host .. "|" .. m.port,
                     max_fails = m.max_fails or DEFAULT_MAX_FAILS, fail_timeout = m.fail_timeout or DEFAULT_FAIL_TIMEOUT,
                     backup = m.backup == true, down = m.down == true }
    end
    local balance = cjson.decode(dict:get("b:" .. name) or "") or { method = "round_robin" }
    cached = { version = version, generation = generation, peers = peers, balance = balance }
    cache[name] = cached
    return cached
end

-- Passive health, as nginx's own (max_fails, fail_timeout), shared by every worker:
-- "f:KEY" counts a member's failures (it expires fail_timeout after the first), "u:KEY" marks it
-- unavailable until it expires fail_timeout later; then requests may try it again (a probe): one
-- more failure makes it unavailable again, a success clears its count.

local function unavailable(peer)
    return peer.max_fails > 0 and shared():get("u:" .. peer.key) ~= nil
end

local function failed(peer)
    if peer.max_fails == 0 then return end
    local dict = shared()
    local fails = dict:incr("f:" .. peer.key, 1, 0, peer.fail_timeout)
    if fails and fails >= peer.max_fails then
        dict:set("u:" .. peer.key, ngx.now() + peer.fail_timeout, peer.fail_timeout)
        -- As nginx: once the pause is over, one more failure (the probe's) pauses it again at once.
        dict:set("f:" .. peer.key, peer.max_fails - 1, 2 * peer.fail_timeout)
        ngx.log(ngx.WARN, "confpy: ", peer.host, ":", peer.port, " of upstream ", peer.key:match("^[^|]+"),
                " failed ", fails, " time(s); not used for ", peer.fail_timeout, "s")
    end
end

local function succeeded(peer)
    if peer.max_fails > 0 then shared():delete("f:" .. peer.key) end
end

-- Which peers this try may use: primaries that are neither down nor unavailable nor tried;
-- else such backups; else, as nginx does rather than failing everything, any untried peer that
-- is not down.
local function candidates(peers, tried)
    local primary, backup, any = {}, {}, {}
    for _, peer in ipairs(peers) do
        if not peer.down and not tried[peer.key] then
            any[#any + 1] = peer
            if not unavailable(peer) then
                if peer.backup then backup[#backup + 1] = peer else primary[#primary + 1] = peer end
            end
        end
    end
    if #primary > 0 then return primary end
    if #backup > 0 then return backup end
    return any
end

-- Smooth weighted round-robin, as nginx's own: each pick adds every candidate's weight to its
-- current weight, takes the largest, and subtracts the total from the one taken.
local function round_robin(cands)
    local best, total = nil, 0
    for _, peer in ipairs(cands) do
        peer.current = peer.current + peer.weight
        total = total + peer.weight
        if best == nil or peer.current > best.current then best = peer end
    end
    if best == nil then return nil end
    best.current = best.current - total
    return best
end

-- least_conn: the fewest requests in flight per unit of weight, ties by round-robin. Counts are
-- this worker's (as nginx's least_conn without a zone).
local function least_conn(cands)
    local tied, best = {}, nil
    for _, peer in ipairs(cands) do
        local load = (active[peer.key] or 0) / peer.weight
        if best == nil or load < best then tied, best = { peer }, load
        elseif load == best then tied[#tied + 1] = peer end
    end
    return round_robin(tied)
end

local function random_pick(cands)
    local total = 0
    for _, peer in ipairs(cands) do total = total + peer.weight end
    local point = math.random() * total
    for _, peer in ipairs(cands) do
        point = point - peer.weight
        if point < 0 then return peer end
    end
    return cands[#cands]
end

-- The request's hash key: ip_hash uses a client's first three IPv4 octets (as nginx), or the whole
-- address; hash expands the configured variables.
local function hash_key(balance)
    if balance.method == "ip_hash" then
        local addr = ngx.var.remote_addr or ""
        return addr:match("^(%d+%.%d+%.%d+)%.%d+$") or addr
    end
    return (balance.key:gsub("%$([%a_][%w_]*)", function(var) return ngx.var[var] or "" end))
end

-- hash: the key picks a member by its hash over the candidates; with `consistent`, by the highest
-- hash of key and member (rendezvous hashing): adding or removing one member moves only its keys.
-- Weights are not used by hash methods here.
local function hashed(cands, balance)
    if #cands == 0 then return nil end
    local key = hash_key(balance)
    if not balance.consistent then
        return cands[ngx.crc32_long(key) % #cands + 1]
    end
    local best, best_score = nil, -1
    for _, peer in ipairs(cands) do
        local score = ngx.crc32_long(key .. "|" .. peer.key)
        if score > best_score then best, best_score = peer, score end
    end
    return best
end

local function pick(entry, tried)
    local cands = candidates(entry.peers, tried)
    local method = entry.balance.method
    if method == "least_conn" then return least_conn(cands) end
    if method == "random" then return #cands > 0 and random_pick(cands) or nil end
    if method == "ip_hash" or method == "hash" then return hashed(cands, entry.balance) end
    return round_robin(cands)
end

-- balancer_by_lua: choose the member for this try. A try that failed before this one (nginx is
-- retrying under proxy_next_upstream) counts against its member at once.
function _M.balance(name)
    local entry = peers_for(name)
    if not entry or #entry.peers == 0 then
        ngx.log(ngx.ERR, "confpy: upstream ", name, " has no members")
        return ngx.exit(NO_LIVE_UPSTREAMS)
    end
    local ctx = ngx.ctx
    local state = ctx.confpy
    if not state then
        state = { tried = {}, tries = {}, name = name }
        ctx.confpy = state
        local more = math.min(#entry.peers, MAX_TRIES) - 1
        if more > 0 then balancer.set_more_tries(more) end
    else
        local last = state.tries[#state.tries]
        if last and not last.counted then
            local kind = balancer.get_last_failure()
            if kind == "failed" or kind == "next" then
                last.counted = true
                failed(last.peer)
            end
        end
    end
    local peer = pick(entry, state.tried)
    if not peer then
        -- every member is down or was tried already (the members can change between two tries)
        ngx.log(ngx.ERR, "confpy: upstream ", name, ": no member left to try after ", #state.tries, " tries")
        return ngx.exit(NO_LIVE_UPSTREAMS)
    end
    state.tried[peer.key] = true
    active[peer.key] = (active[peer.key] or 0) + 1
    state.tries[#state.tries + 1] = { peer = peer }
    -- IPv6 addresses go to nginx in brackets, as in a `server` line.
    local host = peer.host:find(":", 1, true) and ("[" .. peer.host .. "]") or peer.host
    local ok, err = balancer.set_current_peer(host, peer.port)
    if not ok then
        ngx.log(ngx.ERR, "confpy: cannot use ", peer.host, ":", peer.port, ": ", err)
        return ngx.exit(NO_LIVE_UPSTREAMS)
    end
end

-- header_filter_by_lua and log_by_lua (the live template sets both for the whole http block):
-- the last try's outcome. No response header from it means it failed (connect error, timeout,
-- reset); with `proxy_next_upstream off` nothing else sees that failure. The header filter runs
-- before the client has its answer, so the next request, in any worker, already avoids the
-- member; the log phase covers responses that never reach a header filter.
-- The log phase ends the request: its tries are no longer in flight (least_conn's counts).
local function release(state)
    if state.released then return end
    state.released = true
    for _, try in ipairs(state.tries) do
        local key = try.peer.key
        local count = (active[key] or 1) - 1
        active[key] = count > 0 and count or nil
    end
end

function _M.observe()
    local state = ngx.ctx.confpy
    if not state then return end
    if ngx.get_phase() == "log" then release(state) end
    local last = state.tries[#state.tries]
    if not last or last.counted then return end
    last.counted = true
    local header_times = ngx.var.upstream_header_time or ""
    local last_time = header_times:match("([^,%s:]+)%s*$")
    if last_time == nil or last_time == "-" then
        failed(last.peer)
    else
        succeeded(last.peer)
    end
end

_M.log = _M.observe

-- The admin API ------------------------------------------------------------------------------

local function reply(status, body)
    ngx.status = status
    ngx.header["Content-Type"] = "application/json"
    ngx.say(cjson.encode(body))
    return ngx.exit(status)
end

local function describe(name)
    local version, members = load(name)
    members = members or {}
    local dict = shared()
    for _, m in ipairs(members) do
        local key = name .. "|" .. m.host .. "|" .. m.port
        m.fails = dict:get("f:" .. key) or 0
        local until_time = dict:get("u:" .. key)
        m.unavailable_until = until_time  -- Unix time, or nil while the member is usable
        m.unavailable = until_time ~= nil
    end
    local balance = cjson.decode(dict:get("b:" .. name) or "") or { method = "round_robin" }
    return { name = name, version = version, members = members, balance = balance }
end

local function parse_member(text)
    local host, port = text:match("^%[([%x:%.]+)%]:(%d+)$")
    if not host then host, port = text:match("^([%d%.]+):(%d+)$") end
    if not host then return nil end
    return host, tonumber(port)
end

local function manual_version(version)
    return (version or "none") .. "+manual" .. ngx.now()
end

-- Compares in time independent of where the strings differ (the token's length is not secret).
local function same(a, b)
    if type(a) ~= "string" or type(b) ~= "string" or #a ~= #b then return false end
    local diff = 0
    for i = 1, #a do
        diff = bit.bor(diff, bit.bxor(a:byte(i), b:byte(i)))
    end
    return diff == 0
end

local function authorized()
    local header = ngx.req.get_headers()["Authorization"]
    if type(header) ~= "string" then return false end
    local given = header:match("^Bearer%s+(%S+)$")
    return token ~= nil and given ~= nil and same(given, token)
end

-- Who changed what: every change goes to nginx's error log. X-Confpy-Push only lowers the level
-- of confpy's own pushes (any token holder can send it, so it never hides a change: confpy also
-- compares the members nginx serves with its own and restores them, see drift in live.py).
local function audit(method, uri, detail)
    local peer = ngx.var.remote_addr
    if peer == nil or peer == "" or peer == "unix:" then peer = "a client of the Unix socket" end
    if ngx.req.get_headers()["X-Confpy-Push"] == "1" then
        ngx.log(ngx.NOTICE, "confpy admin: ", method, " ", uri, " by ", peer, " (marked as confpy's push): ", detail)
        return
    end
    ngx.log(ngx.WARN, "confpy admin: ", method, " ", uri, " by ", peer, " (not confpy's own push): ", detail)
end

-- The request's body, whatever its size: in memory when it fits client_body_buffer_size (the live
-- template sets it to client_max_body_size, 32 MB), else from the file nginx spooled it to.
local function request_body()
    ngx.req.read_body()
    local data = ngx.req.get_body_data()
    if data then return data end
    local path = ngx.req.get_body_file()
    if not path then return nil end
    local file = io.open(path, "rb")
    if not file then return nil end
    data = file:read("*a")
    file:close()
    return data
end

function _M.admin()
    if not authorized() then
        return reply(401, { error = "a valid token is required: Authorization: Bearer <the token in confpy's token file>" })
    end
    local method = ngx.req.get_method()
    local uri = ngx.unescape_uri(ngx.var.uri)
    if uri == "/upstreams" or uri == "/upstreams/" then
        if method ~= "GET" then return reply(405, { error = "use GET" }) end
        local all = {}
        for name in pairs(known) do all[name] = describe(name) end
        return reply(200, all)
    end
    local name, member = uri:match("^/upstreams/([^/]+)/members/([^/]+)$")
    if not name then name = uri:match("^/upstreams/([^/]+)$") end
    if not name then return reply(404, { error = "try /upstreams or /upstreams/NAME" }) end
    if not known[name] then
        return reply(404, { error = "no upstream " .. name .. " in nginx's configuration" })
    end

    if not member then
        if method == "GET" then return reply(200, describe(name)) end
        if method ~= "PUT" then return reply(405, { error = "use GET or PUT" }) end
        local body = cjson.decode(request_body() or "")
        if type(body) ~= "table" then return reply(400, { error = "body must be JSON: {\"version\": ..., \"members\": [...]}" }) end
        local members, err = check_members(body.members)
        if not members then return reply(400, { error = err }) end
        local balance, berr = check_balance(body.balance)
        if not balance then return reply(400, { error = berr }) end
        local version = body.version and tostring(body.version) or manual_version(nil)
        local ok, serr = store(name, version, members, balance)
        if not ok then return reply(500, { error = "cannot store: " .. tostring(serr) }) end
        audit(method, uri, #members .. " members, version " .. version)
        return reply(200, describe(name))
    end

    local host, port = parse_member(member)
    if not host then return reply(400, { error = "member must be IPv4:PORT or [IPv6]:PORT" }) end
    local version, members = load(name)
    members = members or {}
    if method == "POST" then
        local body = cjson.decode(request_body() or "{}") or {}
        local updated = {}
        for _, m in ipairs(members) do
            if not (m.host == host and m.port == port) then updated[#updated + 1] = m end
        end
        updated[#updated + 1] = { host = host, port = port, weight = body.weight or 1 }
        local clean, err = check_members(updated)
        if not clean then return reply(400, { error = err }) end
        store(name, manual_version(version), clean)
        audit(method, uri, "added " .. member)
        return reply(200, describe(name))
    elseif method == "DELETE" then
        local kept, found = {}, false
        for _, m in ipairs(members) do
            if m.host == host and m.port == port then found = true else kept[#kept + 1] = m end
        end
        if not found then return reply(404, { error = member .. " is not a member of " .. name }) end
        if #kept == 0 then
            return reply(409, { error = "refusing to delete " .. member .. ": it is the last member of " .. name })
        end
        store(name, manual_version(version), kept)
        audit(method, uri, "removed " .. member)
        return reply(200, describe(name))
    end
    return reply(405, { error = "use POST or DELETE" })
end

return _M
