# Per-practitioner baselines (fastpath.baselines): the record beside each quota slot, the Paris
# clock in integers, and one counted lookup observed against the practitioner's own past, as
# fastpath.baselines.observe does on the same bytes.

cdef enum:
    BASE_HEADER_SIZE = 4096
    BASE_GENERATIONS = 3
    BASE_GENERATION_DAYS = 30
    BASE_FILTER_BITS = 1 << 16
    BASE_FILTER_BYTES = BASE_FILTER_BITS // 8
    BASE_PROBES = 4
    BASE_HOURS = 24
    BASE_FIXED = 256
    BASE_COUNT_CAP = 1 << 20
    BASE_HOURS_TOTAL_CAP = 1 << 24
    N_SIGNALS = 5
    SIG_NEW_SHARE = 1
    SIG_NEW_TODAY = 2
    SIG_OFF_HOURS = 4
    SIG_VOLUME = 8
    SIG_NEW_EXCESS = 16


cdef struct BaseRecord:
    uint32_t day
    uint32_t days_active
    uint32_t lookups
    uint32_t new
    uint32_t off_hours
    uint32_t domains
    uint32_t fired
    uint32_t usual_domains
    uint32_t hours_total
    uint32_t suspended_by
    uint32_t generation[BASE_GENERATIONS]
    uint32_t reserved
    uint64_t mean_lookups
    uint64_t square_lookups
    uint64_t mean_new
    uint64_t square_new
    uint64_t mean_share
    uint32_t hours[BASE_HOURS]
    uint32_t today_hours[BASE_HOURS]
    unsigned char filters[BASE_GENERATIONS * BASE_FILTER_BYTES]


cdef struct BaseProfile:
    # baselines.BaselineProfile.packed (PROFILE_VIEW), field for field.
    long long learn_days
    long long min_lookups
    long long new_share_percent
    long long share_margin
    long long new_min
    long long new_mult_percent
    long long sigma
    long long volume_min
    long long volume_mult_percent
    long long off_permille
    long long off_min
    long long share_sigma
    long long excess_min
    long long excess_sigma
    long long excess_share_sigma
    long long excess_margin
    long long enforce


cdef struct BaseCall:
    # One call's baseline: the slot's record (NULL: baselines off or no profile) and profile,
    # and what the last lookup raised (its signals new today, their scores, whether the policy
    # suspends now).
    BaseRecord* rec
    BaseProfile profile
    uint32_t today
    uint32_t fresh
    long long scores[N_SIGNALS]
    bint suspend


if (sizeof(BaseRecord) != _baselines.RECORD_SIZE or BASE_HEADER_SIZE != _baselines.HEADER_SIZE
        or sizeof(BaseProfile) != _baselines.PROFILE_VIEW.size
        or (BASE_GENERATIONS, BASE_GENERATION_DAYS, BASE_FILTER_BITS, BASE_PROBES, BASE_FIXED,
            BASE_COUNT_CAP, BASE_HOURS_TOTAL_CAP, N_SIGNALS)
        != (_baselines.FILTER_GENERATIONS, _baselines.GENERATION_DAYS, _baselines.FILTER_BITS,
            _baselines.FILTER_PROBES, _baselines.FIXED, _baselines.COUNT_CAP,
            _baselines.HOURS_TOTAL_CAP, _baselines.N_SIGNALS)):
    raise ImportError("fastpath/_c/baselines.pxi does not match fastpath.baselines")


cdef inline long long _floor_div(long long a, long long b) noexcept nogil:
    cdef long long q = a / b
    if (a % b != 0) and ((a < 0) != (b < 0)):
        q -= 1
    return q


cdef inline long long _floor_mod(long long a, long long b) noexcept nogil:
    return a - _floor_div(a, b) * b


cdef long long _days_from_civil(long long year, long long month, long long day) noexcept nogil:
    """baselines.days_from_civil."""
    cdef long long era, yoe, doy, doe
    if month <= 2:
        year -= 1
    era = _floor_div(year, 400)
    yoe = year - era * 400
    doy = _floor_div(153 * _floor_mod(month + 9, 12) + 2, 5) + day - 1
    doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
    return era * 146097 + doe - 719468


cdef inline long long _day_number(uint32_t today) noexcept nogil:
    return _days_from_civil(today / 10000, today / 100 % 100, today % 100)


cdef inline long long _last_sunday(long long year, long long month) noexcept nogil:
    cdef long long d = _days_from_civil(year, month, 31)
    return d - _floor_mod(d + 4, 7)


cdef int _paris_hour(uint32_t today, long long now_ms) noexcept nogil:
    """baselines.paris_hour."""
    cdef long long seconds = _floor_div(now_ms, 1000)
    cdef long long year = today / 10000
    cdef long long start = _last_sunday(year, 3) * 86400 + 3600
    cdef long long end = _last_sunday(year, 10) * 86400 + 3600
    cdef long long offset = 7200 if start <= seconds < end else 3600
    return <int>(_floor_mod(seconds + offset, 86400) / 3600)


cdef inline bint _above(long long x, long long mean, long long square,
                        long long sigma) noexcept nogil:
    """baselines._above (var floored at the mean, as a Poisson count's): every product fits,
    counts being capped at BASE_COUNT_CAP."""
    cdef long long d = x * BASE_FIXED - mean
    cdef long long var
    if d <= 0:
        return False
    var = square * BASE_FIXED - mean * mean
    if var < mean * BASE_FIXED:
        var = mean * BASE_FIXED
    return d * d > sigma * sigma * var


cdef inline bint _share_above(long long n, long long x, long long usual,
                              long long sigma) noexcept nogil:
    """baselines._share_above: n, x <= BASE_COUNT_CAP, so d * d < 2**54."""
    cdef long long d = n * 100 - usual * x
    return d > 0 and d * d > sigma * sigma * usual * (100 - usual) * x


cdef inline uint32_t _sat_inc(uint32_t v) noexcept nogil:
    return v + 1 if v < UINT32_MAX else v


cdef void _base_roll(BaseRecord* s, uint32_t today) noexcept nogil:
    """baselines._roll."""
    cdef uint64_t x, n, share, total
    cdef uint32_t generation
    cdef int h, segment
    if s.lookups:
        x = s.lookups if s.lookups < BASE_COUNT_CAP else BASE_COUNT_CAP
        n = s.new if s.new < BASE_COUNT_CAP else BASE_COUNT_CAP
        share = n * 100 * BASE_FIXED / x
        if s.days_active == 0:
            s.mean_lookups = x * BASE_FIXED
            s.square_lookups = x * x * BASE_FIXED
            s.mean_new = n * BASE_FIXED
            s.square_new = n * n * BASE_FIXED
            s.mean_share = share
        else:
            s.mean_lookups = (7 * s.mean_lookups + x * BASE_FIXED) / 8
            s.square_lookups = (7 * s.square_lookups + x * x * BASE_FIXED) / 8
            s.mean_new = (7 * s.mean_new + n * BASE_FIXED) / 8
            s.square_new = (7 * s.square_new + n * n * BASE_FIXED) / 8
            s.mean_share = (7 * s.mean_share + share) / 8
        s.days_active = _sat_inc(s.days_active)
        s.usual_domains |= s.domains
        total = 0
        for h in range(BASE_HOURS):
            s.hours[h] += (s.today_hours[h] if s.today_hours[h] < BASE_COUNT_CAP
                           else BASE_COUNT_CAP)
            total += s.hours[h]
        while total > BASE_HOURS_TOTAL_CAP:
            total = 0
            for h in range(BASE_HOURS):
                s.hours[h] //= 2
                total += s.hours[h]
        s.hours_total = <uint32_t>total
    s.lookups = s.new = s.off_hours = s.domains = s.fired = 0
    memset(s.today_hours, 0, sizeof(s.today_hours))
    s.day = today
    generation = <uint32_t>(_floor_div(_day_number(today), BASE_GENERATION_DAYS) + 1)
    segment = generation % BASE_GENERATIONS
    if s.generation[segment] != generation:
        memset(s.filters + segment * BASE_FILTER_BYTES, 0, BASE_FILTER_BYTES)
        s.generation[segment] = generation


cdef void _observe(BaseCall* b, uint32_t today, long long now_ms, int domain,
                   const unsigned char* storage_key) noexcept nogil:
    """baselines.observe: one counted lookup of the beneficiary of `storage_key` (its bytes
    8..16 place it in the filters) in care `domain`; sets b.fresh, b.scores and b.suspend."""
    cdef BaseRecord* s = b.rec
    cdef const BaseProfile* p = &b.profile
    cdef uint64_t h = 0
    cdef uint32_t h1, h2, generation
    cdef uint32_t bits[BASE_PROBES]
    cdef const unsigned char* f
    cdef bint seen = False
    cdef bint all_set, learned
    cdef int g, i, hour, segment
    cdef long long x, n, usual, share
    cdef uint32_t fire = 0
    if s.day != today:
        _base_roll(s, today)
    generation = <uint32_t>(_floor_div(_day_number(today), BASE_GENERATION_DAYS) + 1)
    segment = generation % BASE_GENERATIONS
    memcpy(&h, storage_key + 8, 8)
    h1 = <uint32_t>h
    h2 = <uint32_t>(h >> 32) | 1
    for i in range(BASE_PROBES):
        bits[i] = (h1 + <uint32_t>i * h2) & (BASE_FILTER_BITS - 1)
    for g in range(BASE_GENERATIONS):
        if s.generation[g] == 0 or <uint32_t>(generation - s.generation[g]) >= 3:
            continue
        f = s.filters + g * BASE_FILTER_BYTES
        all_set = True
        for i in range(BASE_PROBES):
            if not f[bits[i] >> 3] & (1 << (bits[i] & 7)):
                all_set = False
                break
        if all_set:
            seen = True
            break
    for i in range(BASE_PROBES):
        s.filters[segment * BASE_FILTER_BYTES + (bits[i] >> 3)] |= <unsigned char>(
            1 << (bits[i] & 7))
    hour = _paris_hour(today, now_ms)
    s.lookups = _sat_inc(s.lookups)
    if not seen:
        s.new = _sat_inc(s.new)
    s.today_hours[hour] = _sat_inc(s.today_hours[hour])
    s.domains |= <uint32_t>1 << domain
    learned = s.days_active >= p.learn_days
    if learned and (<uint64_t>s.hours[hour] * 1000
                    < <uint64_t>s.hours_total * <uint64_t>p.off_permille):
        s.off_hours = _sat_inc(s.off_hours)
    for i in range(N_SIGNALS):
        b.scores[i] = 0
    if learned:
        x = s.lookups if s.lookups < BASE_COUNT_CAP else BASE_COUNT_CAP
        n = s.new if s.new < BASE_COUNT_CAP else BASE_COUNT_CAP
        share = n * 100 / x
        b.scores[0] = share
        usual = <long long>(s.mean_share / BASE_FIXED)
        if usual > 100:
            usual = 100
        if (x >= p.min_lookups and n * 100 >= p.new_share_percent * x
                and n * 100 * BASE_FIXED
                >= (<long long>s.mean_share + p.share_margin * BASE_FIXED) * x
                and _share_above(n, x, usual, p.share_sigma)):
            fire |= SIG_NEW_SHARE
        b.scores[1] = n * 100 * BASE_FIXED / (<long long>s.mean_new if s.mean_new > 1 else 1)
        if (n >= p.new_min and n * 100 * BASE_FIXED >= p.new_mult_percent * <long long>s.mean_new
                and _above(n, s.mean_new, s.square_new, p.sigma)):
            fire |= SIG_NEW_TODAY
        b.scores[2] = s.off_hours if s.off_hours < BASE_COUNT_CAP else BASE_COUNT_CAP
        if s.off_hours >= p.off_min:
            fire |= SIG_OFF_HOURS
        b.scores[3] = x * 100 * BASE_FIXED / (
            <long long>s.mean_lookups if s.mean_lookups > 1 else 1)
        if (x >= p.volume_min
                and x * 100 * BASE_FIXED >= p.volume_mult_percent * <long long>s.mean_lookups
                and _above(x, s.mean_lookups, s.square_lookups, p.sigma)):
            fire |= SIG_VOLUME
        b.scores[4] = share - usual if share > usual else 0
        if (n >= p.excess_min
                and n * 100 * BASE_FIXED
                >= (<long long>s.mean_share + p.excess_margin * BASE_FIXED) * x
                and _above(n, s.mean_new, s.square_new, p.excess_sigma)
                and _share_above(n, x, usual, p.excess_share_sigma)):
            fire |= SIG_NEW_EXCESS
    b.fresh = fire & ~s.fired
    s.fired |= fire
    b.suspend = (b.fresh != 0 and p.enforce != 0
                 and (s.fired & <uint32_t>p.enforce) == <uint32_t>p.enforce)
    if b.suspend:
        s.suspended_by = <uint32_t>p.enforce


cdef bint _baseline_view(object practitioner, BaseCall* b, unsigned char* base_map,
                         long long slot, long long slots) except -1:
    """The caller's baseline record and profile (practitioner.baseline_view), or b.rec NULL when
    the gate keeps no baselines, the practitioner has no profile or its slot is beyond the file:
    baselines are advice, and a lookup they cannot see is decided all the same."""
    b.rec = NULL
    if base_map == NULL or slot < 0 or slot >= slots:
        return False
    view = practitioner.baseline_view
    if view is None:
        return False
    if type(view) is not bytes or PyBytes_GET_SIZE(view) != sizeof(BaseProfile):
        raise TypeError("practitioner.baseline_view is not a rules.Practitioner's")
    memcpy(&b.profile, PyBytes_AS_STRING(view), sizeof(BaseProfile))
    b.rec = <BaseRecord*>(base_map + BASE_HEADER_SIZE + slot * sizeof(BaseRecord))
    return True
