/*
 * diskwriter: appends numbered, checksummed 512-byte records to a raw block device, so
 * a test can prove afterwards that no acknowledged write was lost or written twice.
 *
 *   diskwriter write DEVICE RATE TAG [STATUS_FILE]   append RATE records/s (0 = max)
 *   diskwriter verify DEVICE                         scan and print a JSON summary
 *
 * Record layout (little-endian), record with sequence number N sits at byte (N-1)*512:
 *   0 magic "FERRYDW1" | 8 u64 seq | 16 boot_id[16] | 32 i64 wall-clock ns |
 *   40 u32 version | 44 u32 tag length | 48 tag[64] | 112 zero | 508 u32 CRC-32 of 0..507
 * The host-side reader is ferry/lab/diskrecords.py; keep both in step.
 *
 * A scan stops at the first all-zero block, so a writer started on a fresh boot (or
 * on another node) continues the sequence where the disk says it ended.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define REC_SIZE 512
#define CRC_OFF 508
#define TAG_MAX 64
#define SCAN_CHUNK (1024 * 1024)
#define LIST_MAX 1000
#define STATUS_INTERVAL 0.2

static const char MAGIC[8] = {'F', 'E', 'R', 'R', 'Y', 'D', 'W', '1'};

struct record {
    uint64_t seq;
    unsigned char boot_id[16];
    int64_t time_ns;
    char tag[TAG_MAX + 1];
};

struct segment {
    uint64_t first, last;
    struct record rec;
};

struct scan {
    uint64_t blocks;   /* non-zero blocks before the first zero block */
    uint64_t records;  /* valid records among them */
    uint64_t first, last, bad;
    uint64_t gaps[LIST_MAX][2];
    size_t ngaps;
    int gaps_truncated;
    struct segment segs[LIST_MAX];
    size_t nsegs;
    int segs_truncated;
};

static uint32_t crc_table[256];

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

/* Same CRC-32 as zlib.crc32, so the host can check records with the standard library. */
static uint32_t crc32_buf(const unsigned char *p, size_t n)
{
    uint32_t c = 0xFFFFFFFFu;
    while (n--)
        c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

static void put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put_u64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t get_u32(const unsigned char *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static uint64_t get_u64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static double now_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int64_t now_wall_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* A missing boot_id (not Linux) leaves zeros: records still verify, reboots just don't show. */
static void read_boot_id(unsigned char out[16])
{
    char text[64] = {0};
    int n = 0;
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
    memset(out, 0, 16);
    if (!f)
        return;
    if (!fgets(text, sizeof text, f))
        text[0] = 0;
    fclose(f);
    for (const char *p = text; *p && n < 32; p++) {
        int h = hexval(*p);
        if (h < 0)
            continue;
        out[n / 2] = (unsigned char)(out[n / 2] | (h << ((n % 2) ? 0 : 4)));
        n++;
    }
}

static void format_uuid(const unsigned char id[16], char out[37])
{
    static const char hex[] = "0123456789abcdef";
    int o = 0;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            out[o++] = '-';
        out[o++] = hex[id[i] >> 4];
        out[o++] = hex[id[i] & 15];
    }
    out[o] = 0;
}

/* Tags travel in JSON and kernel command lines: printable ASCII keeps both simple. */
static int tag_ok(const char *tag)
{
    if (strlen(tag) > TAG_MAX)
        return 0;
    for (const char *p = tag; *p; p++)
        if (*p < 0x20 || *p > 0x7e)
            return 0;
    return 1;
}

static void json_string(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            fprintf(f, "\\%c", *s);
        else if ((unsigned char)*s < 0x20 || (unsigned char)*s > 0x7e)
            fprintf(f, "\\u%04x", (unsigned char)*s);
        else
            fputc(*s, f);
    }
    fputc('"', f);
}

static void encode(unsigned char *b, const struct record *r)
{
    size_t len = strlen(r->tag);
    memset(b, 0, REC_SIZE);
    memcpy(b, MAGIC, 8);
    put_u64(b + 8, r->seq);
    memcpy(b + 16, r->boot_id, 16);
    put_u64(b + 32, (uint64_t)r->time_ns);
    put_u32(b + 40, 1);
    put_u32(b + 44, (uint32_t)len);
    memcpy(b + 48, r->tag, len);
    put_u32(b + CRC_OFF, crc32_buf(b, CRC_OFF));
}

/* Returns 1 for a valid record, 0 for a damaged or foreign block. */
static int decode(const unsigned char *b, struct record *r)
{
    uint32_t len = get_u32(b + 44);
    if (memcmp(b, MAGIC, 8) != 0 || len > TAG_MAX)
        return 0;
    if (get_u32(b + CRC_OFF) != crc32_buf(b, CRC_OFF))
        return 0;
    r->seq = get_u64(b + 8);
    memcpy(r->boot_id, b + 16, 16);
    r->time_ns = (int64_t)get_u64(b + 32);
    memcpy(r->tag, b + 48, len);
    r->tag[len] = 0;
    return 1;
}

static int all_zero(const unsigned char *b)
{
    for (int i = 0; i < REC_SIZE; i++)
        if (b[i])
            return 0;
    return 1;
}

static int same_writer(const struct record *a, const struct record *b)
{
    return strcmp(a->tag, b->tag) == 0 && memcmp(a->boot_id, b->boot_id, 16) == 0;
}

static void scan_note(struct scan *s, const struct record *r)
{
    if (s->records > 0 && r->seq != s->last + 1) {
        if (s->ngaps < LIST_MAX) {
            s->gaps[s->ngaps][0] = s->last;
            s->gaps[s->ngaps][1] = r->seq;
            s->ngaps++;
        } else {
            s->gaps_truncated = 1;
        }
    }
    struct segment *cur = s->nsegs ? &s->segs[s->nsegs - 1] : NULL;
    if (cur && same_writer(&cur->rec, r) && r->seq == cur->last + 1) {
        cur->last = r->seq;
    } else if (s->nsegs < LIST_MAX) {
        s->segs[s->nsegs].first = s->segs[s->nsegs].last = r->seq;
        s->segs[s->nsegs].rec = *r;
        s->nsegs++;
    } else {
        s->segs_truncated = 1;
    }
    if (s->records == 0)
        s->first = r->seq;
    s->last = r->seq;
    s->records++;
}

/* Walks the blocks in order; returns 0, or -1 with errno set on a read error. */
static int scan_blocks(int fd, unsigned char *buf, struct scan *s)
{
    off_t off = 0;
    for (;;) {
        ssize_t n = pread(fd, buf, SCAN_CHUNK, off);
        if (n < 0)
            return -1;
        for (ssize_t i = 0; i + REC_SIZE <= n; i += REC_SIZE) {
            struct record r;
            if (all_zero(buf + i))
                return 0;
            s->blocks++;
            if (decode(buf + i, &r))
                scan_note(s, &r);
            else
                s->bad++;
        }
        if (n < SCAN_CHUNK)
            return 0;
        off += n;
    }
}

static unsigned char *aligned_buf(size_t size)
{
    void *p = NULL;
    if (posix_memalign(&p, 4096, size) != 0)
        return NULL;
    memset(p, 0, size);
    return p;
}

/* O_DIRECT keeps the guest's page cache out of the way: every record really reaches the
 * virtual disk, and a scan sees what the disk holds. Files that refuse it still work. */
static int open_device(const char *path, int flags)
{
    int fd = open(path, flags | O_DIRECT | O_CLOEXEC);
    if (fd < 0 && errno == EINVAL)
        fd = open(path, flags | O_CLOEXEC);
    return fd;
}

static int scan_device(const char *path, struct scan *s)
{
    unsigned char *buf = aligned_buf(SCAN_CHUNK);
    int fd = open_device(path, O_RDONLY);
    int rc = -1;
    memset(s, 0, sizeof *s);
    if (buf && fd >= 0)
        rc = scan_blocks(fd, buf, s);
    if (fd >= 0)
        close(fd);
    free(buf);
    return rc;
}

static void print_segments(FILE *f, const struct scan *s)
{
    fputs("\"segments\":[", f);
    for (size_t i = 0; i < s->nsegs; i++) {
        char uuid[37];
        format_uuid(s->segs[i].rec.boot_id, uuid);
        fprintf(f, "%s{\"first\":%llu,\"last\":%llu,\"tag\":", i ? "," : "",
                (unsigned long long)s->segs[i].first, (unsigned long long)s->segs[i].last);
        json_string(f, s->segs[i].rec.tag);
        fprintf(f, ",\"boot_id\":\"%s\"}", uuid);
    }
    fprintf(f, "],\"segments_truncated\":%s", s->segs_truncated ? "true" : "false");
}

static int cmd_verify(const char *dev)
{
    static struct scan s;
    if (scan_device(dev, &s) != 0) {
        printf("{\"error\":");
        json_string(stdout, strerror(errno));
        printf("}\n");
        return 1;
    }
    int continuous = s.ngaps == 0 && !s.gaps_truncated && s.bad == 0 &&
                     (s.records == 0 || s.first == 1);
    printf("{\"records\":%llu,", (unsigned long long)s.records);
    if (s.records)
        printf("\"first\":%llu,\"last\":%llu,", (unsigned long long)s.first,
               (unsigned long long)s.last);
    else
        printf("\"first\":null,\"last\":null,");
    printf("\"continuous\":%s,\"bad_crc\":%llu,\"blocks\":%llu,\"gaps\":[",
           continuous ? "true" : "false", (unsigned long long)s.bad,
           (unsigned long long)s.blocks);
    for (size_t i = 0; i < s.ngaps; i++)
        printf("%s[%llu,%llu]", i ? "," : "", (unsigned long long)s.gaps[i][0],
               (unsigned long long)s.gaps[i][1]);
    printf("],\"gaps_truncated\":%s,", s.gaps_truncated ? "true" : "false");
    print_segments(stdout, &s);
    printf("}\n");
    return 0;
}

struct writer {
    const char *dev, *status_path, *tag;
    double rate;
    uint64_t first_seq, last_seq, written, errors;
    char last_error[128];
    double started, last_status, rate_t0;
    uint64_t rate_n0;
    double achieved;
    int running;
};

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

/* Written to a temporary file and renamed, so the status CGI never reads half a file. */
static void write_status(struct writer *w)
{
    char tmp[512];
    double now = now_mono();
    if (!w->status_path)
        return;
    if (now - w->rate_t0 >= 1.0 || !w->running) {
        w->achieved = (double)(w->written - w->rate_n0) / (now - w->rate_t0);
        w->rate_t0 = now;
        w->rate_n0 = w->written;
    }
    snprintf(tmp, sizeof tmp, "%s.tmp", w->status_path);
    FILE *f = fopen(tmp, "w");
    if (!f)
        return;
    fprintf(f, "{\"running\":%s,\"pid\":%d,\"device\":", w->running ? "true" : "false",
            (int)getpid());
    json_string(f, w->dev);
    fputs(",\"tag\":", f);
    json_string(f, w->tag);
    fprintf(f, ",\"target_rate\":%g,\"rate\":%.2f,\"first_seq\":%llu,\"last_seq\":%llu,"
               "\"written\":%llu,\"errors\":%llu,\"elapsed\":%.3f,\"last_error\":",
            w->rate, w->achieved, (unsigned long long)w->first_seq,
            (unsigned long long)w->last_seq, (unsigned long long)w->written,
            (unsigned long long)w->errors, now - w->started);
    json_string(f, w->last_error);
    fputs("}\n", f);
    fclose(f);
    rename(tmp, w->status_path);
    w->last_status = now;
}

static void note_error(struct writer *w, const char *what)
{
    w->errors++;
    snprintf(w->last_error, sizeof w->last_error, "%s: %s", what, strerror(errno));
}

/* One record: write and flush; on failure the same sequence number is tried again. */
static int put_record(struct writer *w, int fd, unsigned char *buf, const unsigned char *bid)
{
    struct record r;
    memset(&r, 0, sizeof r);
    r.seq = w->last_seq + 1;
    memcpy(r.boot_id, bid, 16);
    r.time_ns = now_wall_ns();
    snprintf(r.tag, sizeof r.tag, "%s", w->tag);
    encode(buf, &r);
    if (pwrite(fd, buf, REC_SIZE, (off_t)(r.seq - 1) * REC_SIZE) != REC_SIZE) {
        note_error(w, "write");
        return -1;
    }
    if (fdatasync(fd) != 0) {
        note_error(w, "fdatasync");
        return -1;
    }
    w->last_seq = r.seq;
    w->written++;
    return 0;
}

static void sleep_until(double t)
{
    double d = t - now_mono();
    if (d <= 0)
        return;
    struct timespec ts = {(time_t)d, (long)((d - (double)(time_t)d) * 1e9)};
    nanosleep(&ts, NULL);
}

/* Paces against an absolute schedule; after a long stall (a paused VM) it restarts the
 * schedule rather than bursting to catch up. */
static void write_loop(struct writer *w, int fd, unsigned char *buf)
{
    unsigned char bid[16];
    double next = now_mono();
    read_boot_id(bid);
    while (!stop_requested) {
        if (w->rate > 0) {
            double now = now_mono();
            double until = next < now + STATUS_INTERVAL ? next : now + STATUS_INTERVAL;
            sleep_until(until);
            if (now_mono() - w->last_status >= STATUS_INTERVAL)
                write_status(w);
            if (now_mono() < next || stop_requested)
                continue;
            next += 1.0 / w->rate;
            if (now_mono() - next > 1.0)
                next = now_mono();
        }
        if (put_record(w, fd, buf, bid) != 0)
            sleep_until(now_mono() + 0.1);
        if (now_mono() - w->last_status >= STATUS_INTERVAL)
            write_status(w);
    }
}

static int writer_start(struct writer *w)
{
    static struct scan s;
    if (scan_device(w->dev, &s) != 0) {
        note_error(w, "scan");
        return -1;
    }
    /* Continue after the last valid record; a damaged tail block is overwritten. */
    w->last_seq = s.records ? s.last : 0;
    if (s.blocks > w->last_seq) {
        fprintf(stderr, "diskwriter: %llu blocks but last seq %llu; continuing at %llu\n",
                (unsigned long long)s.blocks, (unsigned long long)w->last_seq,
                (unsigned long long)w->last_seq + 1);
    }
    w->first_seq = w->last_seq + 1;
    return 0;
}

static int cmd_write(const char *dev, const char *rate, const char *tag, const char *status)
{
    struct writer w;
    memset(&w, 0, sizeof w);
    w.dev = dev;
    w.tag = tag;
    w.status_path = status;
    w.rate = atof(rate);
    w.started = w.rate_t0 = now_mono();
    w.running = 1;
    if (!tag_ok(tag) || w.rate < 0) {
        fprintf(stderr, "diskwriter: tag must be printable ASCII of at most 64 bytes, "
                        "rate >= 0\n");
        return 2;
    }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    unsigned char *buf = aligned_buf(4096);
    int fd = open_device(dev, O_RDWR);
    if (!buf || fd < 0 || writer_start(&w) != 0) {
        if (fd < 0)
            note_error(&w, "open");
        w.running = 0;
        write_status(&w);
        fprintf(stderr, "diskwriter: %s\n", w.last_error);
        return 1;
    }
    write_status(&w);
    write_loop(&w, fd, buf);
    close(fd);
    w.running = 0;
    write_status(&w);
    free(buf);
    return 0;
}

int main(int argc, char **argv)
{
    crc_init();
    if (argc == 3 && strcmp(argv[1], "verify") == 0)
        return cmd_verify(argv[2]);
    if ((argc == 5 || argc == 6) && strcmp(argv[1], "write") == 0)
        return cmd_write(argv[2], argv[3], argv[4], argc == 6 ? argv[5] : NULL);
    fprintf(stderr, "usage: diskwriter write DEVICE RATE TAG [STATUS_FILE]\n"
                    "       diskwriter verify DEVICE\n");
    return 2;
}
