// SPDX-License-Identifier: GPL-2.0-only
/*
 * ferry_cbt: block-level change tracker for ferry's DR replication.
 *
 * Module init/exit. The hooks are probes on the block_bio_queue,
 * block_split, block_rq_complete and block_bio_complete tracepoints (see
 * hook.c). Their structs are not exported to modules, so they are found by
 * name with for_each_kernel_tracepoint() and
 * attached with tracepoint_probe_register(): both EXPORT_SYMBOL_GPL, the
 * interface out-of-tree tracers (LTTng) use. No kernel text or read-only
 * data is written. If any of them is missing, or cannot be attached,
 * the module refuses to load: nothing is half-tracked.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/reboot.h>
#include <linux/string.h>
#include <linux/tracepoint.h>

#include "cbt.h"

/*
 * The probes, attached in this order and detached in the reverse: the
 * completion side first, so that a write the queue probe enters into the
 * in-flight table always has its completion seen.
 */
static struct ferry_probe {
	const char *name;
	void *fn;
	struct tracepoint *tp;
	bool attached;
} ferry_probes[] = {
	{ "block_rq_complete", ferry_hook_rq_complete },
	{ "block_bio_complete", ferry_hook_bio_complete },
	{ "block_split", ferry_hook_split },
	{ "block_bio_queue", ferry_hook_bio_queue },
};

module_param_named(state_dir, ferry_state_dir, charp, 0444);
MODULE_PARM_DESC(state_dir, "folder of the disks' state files (empty: none)");
static char *ferry_disks;
module_param_named(disks, ferry_disks, charp, 0444);
MODULE_PARM_DESC(disks, "MAJOR:MINOR,... to attach again at load from their state files");

static int ferry_reboot(struct notifier_block *nb, unsigned long action, void *data)
{
	ferry_ctl_save_all();
	return NOTIFY_DONE;
}

static struct notifier_block ferry_reboot_nb = {
	.notifier_call = ferry_reboot,
};

static void ferry_match_tp(struct tracepoint *tp, void *priv)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(ferry_probes); i++)
		if (!strcmp(tp->name, ferry_probes[i].name))
			ferry_probes[i].tp = tp;
}

static void ferry_detach_probes(void)
{
	int i;

	for (i = ARRAY_SIZE(ferry_probes) - 1; i >= 0; i--) {
		if (ferry_probes[i].attached)
			tracepoint_probe_unregister(ferry_probes[i].tp, ferry_probes[i].fn, NULL);
		ferry_probes[i].attached = false;
	}
	tracepoint_synchronize_unregister();
}

static int __init ferry_cbt_init(void)
{
	size_t i;
	int ret;

	for_each_kernel_tracepoint(ferry_match_tp, NULL);
	for (i = 0; i < ARRAY_SIZE(ferry_probes); i++) {
		if (!ferry_probes[i].tp) {
			pr_err("tracepoint %s not found; not loading (nothing would be tracked)\n", ferry_probes[i].name);
			return -ENOENT;
		}
	}
	for (i = 0; i < ARRAY_SIZE(ferry_probes); i++) {
		ret = tracepoint_probe_register(ferry_probes[i].tp, ferry_probes[i].fn, NULL);
		if (ret) {
			pr_err("cannot attach to tracepoint %s (%d); not loading\n", ferry_probes[i].name, ret);
			ferry_detach_probes();
			return ret;
		}
		ferry_probes[i].attached = true;
	}
	ret = ferry_ctl_init();
	if (ret) {
		ferry_detach_probes();
		return ret;
	}
	ferry_ctl_restore(ferry_disks);
	register_reboot_notifier(&ferry_reboot_nb);
	pr_info("loaded: ABI %u, hooks block_bio_queue, block_split, block_rq_complete, block_bio_complete; /dev/ferry-cbt\n",
		FERRY_CBT_ABI_VERSION);
	return 0;
}

static void __exit ferry_cbt_exit(void)
{
	/* No descriptor or mapping is left (each pins the module); disks may
	 * still be attached. Stop new opens, unpublish every disk, detach the
	 * probe, wait for probes still running, then free. */
	unregister_reboot_notifier(&ferry_reboot_nb);
	ferry_ctl_unregister();
	ferry_ctl_unpublish_all();
	ferry_detach_probes();
	ferry_ctl_release_unpublished();
	pr_info("unloaded\n");
}

module_init(ferry_cbt_init);
module_exit(ferry_cbt_exit);

MODULE_LICENSE("GPL");
MODULE_AUTHOR("ferry");
MODULE_DESCRIPTION("ferry block-level change tracker (block_bio_queue probe, shared record ring)");
MODULE_VERSION("0.1.0");
